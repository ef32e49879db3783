//! `ingest`: raw telemetry → validated samples → aligned Observations.
//!
//! Sources ([`sources`]): Zenoh raw topics (`{fleet}/{robot}/raw/{sensor}`, carrying either a
//! NanoBot envelope with a RawFrame or a compact device frame from zenoh-pico), a UDP socket and
//! a serial port (device frames, see `nanobot_messages::device`), each into a bounded inbox.
//! Every frame is checked ([`core`]) — CRC, sizes, value ranges, monotonic timestamps and
//! sequence numbers, the JPEG header — and a bad one is counted per robot and reason, logged at
//! a bounded rate and published on `{fleet}/{robot}/rejects` ([`rejects`]); sequence gaps are
//! counted as loss. The robot's state stream is the reference: each new state sample is joined
//! with the latest camera, surface and action samples taken at or before it (within the
//! staleness limit) into one Observation, at most `rate_hz` times a second.
//!
//! [`IngestCore`] is that logic without I/O; `nanobot collect` runs it without a fleet.

pub mod core;
pub mod rejects;
pub mod sources;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nanobot_messages::{codec::now_ns, topics, Event, Observation};

pub use self::core::{
    sample_from_device, sample_from_payload, sample_from_raw, IngestConfig, IngestCore, Produced, Reading, Refused,
    RobotCounts, SensorSample, SerialConfig, UNATTRIBUTED,
};
pub use self::rejects::RejectLog;
pub use self::sources::{open_serial, DatagramCounts, DeviceResult, SerialReader};

use crate::bus::{HopKind, Inbox, Keep, PubQos, Publisher, RawSample, Received};
use crate::runtime::{AbortOnDrop, ActorError, Ctx, Input, Metrics, NodeActor};

/// Something is waiting in one of ingest's inboxes.
#[derive(Clone, Copy, Debug)]
pub struct Waiting;

pub struct Ingest {
    core: IngestCore,
    raw: Option<Inbox<RawSample>>,
    events: Inbox<Received<Event>>,
    device: Inbox<DeviceResult>,
    obs: HashMap<String, Publisher<Observation>>,
    rejects: rejects::RejectsOut,
    datagrams: Arc<DatagramCounts>,
    _udp: Option<AbortOnDrop>,
    _serial: Option<SerialReader>,
}

impl Ingest {
    async fn publish(&mut self, ctx: &Ctx<Self>, out: Produced) {
        let c = &ctx.counters;
        match out {
            Produced::Observation {
                robot,
                seq,
                stamp_ns,
                obs,
                trace,
            } => {
                if !self.obs.contains_key(&robot) {
                    match ctx
                        .bus
                        .publisher(&topics::obs(ctx.fleet(), &robot), &robot, PubQos::Sensor)
                        .await
                    {
                        Ok(p) => {
                            self.obs.insert(robot.clone(), p);
                        }
                        Err(e) => {
                            tracing::warn!(robot, error = %e, "no observation publisher");
                            return;
                        }
                    }
                }
                // The observation continues its frames' trace when that one is sampled.
                let (parent, start) = (trace, now_ns());
                let trace = trace.map(|t| t.child());
                match self.obs[&robot].put_with(&obs, seq, stamp_ns, trace.as_ref()).await {
                    Ok(_) => {
                        let kind = HopKind::Producer;
                        ctx.bus.hop(
                            "ingest.observation",
                            trace.as_ref(),
                            parent.as_ref(),
                            start,
                            &robot,
                            seq,
                            kind,
                        );
                        c.handled.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        tracing::warn!(robot, error = %e, "observation not published");
                        c.errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            Produced::Reject { robot, reject } => {
                c.dropped.fetch_add(1, Ordering::Relaxed);
                self.rejects.publish(&robot, &reject).await;
            }
        }
    }

    fn take_events(&mut self, fleet: &str) {
        while let Some(r) = self.events.take() {
            match topics::robot_of(fleet, r.key.as_str()) {
                Some(robot) => {
                    let robot = robot.to_string();
                    self.core.on_event(&robot, &r.msg)
                }
                None => tracing::debug!(key = %r.key, "event key names no robot"),
            }
        }
    }
}

impl NodeActor for Ingest {
    const KIND: &'static str = "ingest";
    type Config = IngestConfig;
    type Event = Waiting;

    fn grants(fleet: &str, robots: &[String]) -> crate::access::Grants {
        use nanobot_messages::topics;
        crate::access::Grants::default().put(
            robots
                .iter()
                .flat_map(|r| [topics::obs(fleet, r), topics::rejects(fleet, r)]),
        )
    }

    async fn start(ctx: &Ctx<Self>, cfg: IngestConfig) -> Result<Self, ActorError> {
        cfg.validate().map_err(|e| ctx.config_error(e))?;
        let fleet = ctx.fleet();
        let robots = ctx.spec.robot.clone().unwrap_or_else(|| "*".into());
        let raw = if cfg.zenoh {
            let key = format!("{fleet}/{robots}/raw/*");
            Some(
                ctx.subscribe_raw("raw", &key, Keep::All { queue: 1024 }, Some(|| Waiting))
                    .await?,
            )
        } else {
            None
        };
        let events = ctx
            .subscribe(
                "events",
                &format!("{fleet}/{robots}/event"),
                Keep::All { queue: 256 },
                Some(|| Waiting),
            )
            .await?;
        let (feeder, device) = ctx.input::<DeviceResult>("device", Keep::All { queue: 4096 }, Some(|| Waiting));
        let datagrams = Arc::new(DatagramCounts::default());
        let udp = match &cfg.udp {
            Some(addr) => {
                let sock = tokio::net::UdpSocket::bind(addr)
                    .await
                    .map_err(|e| ctx.config_error(format!("udp {addr}: {e}")))?;
                tracing::info!(addr = %sock.local_addr().map(|a| a.to_string()).unwrap_or_default(), "ingest listening for device frames on UDP");
                let f = feeder.clone();
                Some(AbortOnDrop(sources::spawn_udp(sock, datagrams.clone(), move |r| {
                    f.push(r);
                })))
            }
            None => None,
        };
        let serial = match &cfg.serial {
            Some(s) => {
                let port = open_serial(s).map_err(|e| ctx.config_error(format!("serial {}: {e}", s.device)))?;
                let f = feeder.clone();
                Some(
                    SerialReader::spawn(port, s.device.clone(), move |r| {
                        f.push(r);
                        true
                    })
                    .map_err(|e| ctx.failed(format!("serial {}: {e}", s.device)))?,
                )
            }
            None => None,
        };
        let every = Duration::from_millis(cfg.reject_log_interval_ms);
        Ok(Ingest {
            core: IngestCore::new(cfg),
            raw,
            events,
            device,
            obs: HashMap::new(),
            rejects: rejects::RejectsOut::new(ctx.bus.clone(), every),
            datagrams,
            _udp: udp,
            _serial: serial,
        })
    }

    async fn handle(&mut self, ctx: &Ctx<Self>, _input: Input<Waiting>) -> Result<(), ActorError> {
        // Episode events first: a frame is numbered in the episode that started before it.
        self.take_events(ctx.fleet());
        loop {
            let mut any = false;
            if let Some(r) = self.raw.as_ref().and_then(|i| i.take()) {
                any = true;
                self.take_events(ctx.fleet());
                let from_device = r.payload.starts_with(&nanobot_messages::device::MAGIC);
                let out = self.on_raw(ctx.fleet(), r);
                if let Some(out) = out.map(|o| if from_device { start_trace(o, &ctx.bus) } else { o }) {
                    self.publish(ctx, out).await;
                }
            }
            if let Some(r) = self.device.take() {
                any = true;
                if let Some(out) = self.core.on_device(r).map(|o| start_trace(o, &ctx.bus)) {
                    self.publish(ctx, out).await;
                }
            }
            if !any {
                break;
            }
        }
        Ok(())
    }

    fn metrics(&self, m: &mut Metrics) {
        let mut totals = RobotCounts::default();
        for rc in self.core.counts.values() {
            totals.accepted += rc.accepted;
            totals.observations += rc.observations;
            totals.lost += rc.lost;
            totals.stale += rc.stale;
            totals.decimated += rc.decimated;
            for (k, v) in &rc.rejects {
                *totals.rejects.entry(k.clone()).or_default() += v;
            }
        }
        m.set("accepted", totals.accepted as f64);
        m.set("observations", totals.observations as f64);
        m.set("lost", totals.lost as f64);
        m.set("stale", totals.stale as f64);
        m.set("decimated", totals.decimated as f64);
        for (k, v) in totals.rejects {
            m.set(format!("rejects.{k}"), v as f64);
        }
        let d = &self.datagrams;
        m.set("udp.datagrams", d.datagrams.load(Ordering::Relaxed) as f64);
        m.set("udp.empty", d.empty.load(Ordering::Relaxed) as f64);
        m.set("udp.with_errors", d.with_errors.load(Ordering::Relaxed) as f64);
    }
}

/// Device frames (zenoh-pico boards, UDP and serial bridges) carry no trace context: their
/// traces start at ingest, sampled at the bus's ratio. A NanoBot envelope without one belongs
/// to an unsampled trace and stays untraced.
fn start_trace(mut out: Produced, bus: &crate::bus::Bus) -> Produced {
    if let Produced::Observation { trace: t @ None, .. } = &mut out {
        *t = bus.new_trace();
    }
    out
}

impl Ingest {
    /// A Zenoh raw-topic payload as a sample, or a refusal.
    fn on_raw(&mut self, fleet: &str, r: RawSample) -> Option<Produced> {
        let robot = topics::robot_of(fleet, &r.key).unwrap_or(UNATTRIBUTED).to_string();
        match sample_from_payload(&robot, r.payload, r.trace) {
            Ok(sample) => self.core.on_sample(sample),
            Err(refused) => {
                let sensor = r.key.rsplit('/').next().unwrap_or_default().to_string();
                Some(self.core.refuse(Refused { sensor, ..refused }))
            }
        }
    }
}
