//! The bus over real Zenoh sessions on loopback: two sessions per test, a fresh port each,
//! multicast scouting off.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nanobot_actors::bus::{Bus, BusConfig, Keep, PubQos};
use nanobot_messages::{Blob, DType, Event, EventKind, Kind, ReplayBatch, ReplayRequest, TensorView, TraceContext};

fn free_port() -> u16 {
    nanobot_actors::bus::free_loopback_port().expect("a free loopback port")
}

/// Two connected sessions: a listening node and a peer that connects to it.
async fn pair() -> (Bus, Bus) {
    let ep = format!("tcp/127.0.0.1:{}", free_port());
    let a = Bus::open(
        &BusConfig {
            listen: vec![ep.clone()],
            ..BusConfig::default()
        },
        "t",
    )
    .await
    .unwrap();
    let b = Bus::open(
        &BusConfig {
            connect: vec![ep],
            ..BusConfig::default()
        },
        "t",
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.session().info().peers_zid().await.count() == 0 {
        assert!(Instant::now() < deadline, "sessions did not connect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (a, b)
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn reward(v: f32) -> Event {
    Event {
        episode: 1,
        event: EventKind::Reward { value: v },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_only_keeps_the_newest_and_counts_the_replaced() {
    let (a, b) = pair().await;
    let sub = a.subscribe::<Event>("t/r0/event", Keep::Latest, || {}).await.unwrap();
    let publisher = b.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
    assert!(publisher.wait_matched(Duration::from_secs(10)).await, "subscriber seen");
    for i in 0..50 {
        publisher.put(&reward(i as f32)).await.unwrap();
    }
    until("50 arrivals", || sub.stats().received.load(Ordering::Relaxed) == 50).await;
    let newest = sub.take().expect("a message");
    assert_eq!(newest.header.seq, 49);
    assert_eq!(newest.header.robot, "r0");
    assert_eq!(newest.msg, reward(49.0));
    assert_eq!(sub.stats().replaced.load(Ordering::Relaxed), 49);
    assert!(sub.take().is_none(), "taken once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_and_never_stalls_the_session() {
    let (a, b) = pair().await;
    // A consumer that takes nothing, and a second subscriber on the same session.
    let stuck = a
        .subscribe::<Event>("t/r0/event", Keep::All { queue: 4 }, || {})
        .await
        .unwrap();
    let other = a
        .subscribe::<Event>("t/r1/event", Keep::All { queue: 16 }, || {})
        .await
        .unwrap();
    let p0 = b.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
    let p1 = b.publisher::<Event>("t/r1/event", "r1", PubQos::Data).await.unwrap();
    assert!(p0.wait_matched(Duration::from_secs(10)).await && p1.wait_matched(Duration::from_secs(10)).await);
    for i in 0..200 {
        p0.put(&reward(i as f32)).await.unwrap();
    }
    // Zenoh's receive thread was never held by the full queue: the other subscriber gets its
    // message (with a blocking queue, the 5th arrival above would have parked that thread).
    p1.put(&reward(7.0)).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), other.recv())
        .await
        .expect("the session is not stalled");
    assert_eq!(r.msg, reward(7.0));
    until("200 arrivals", || stuck.stats().received.load(Ordering::Relaxed) == 200).await;
    let kept: Vec<u64> = std::iter::from_fn(|| stuck.take()).map(|r| r.header.seq).collect();
    assert_eq!(kept, [0, 1, 2, 3], "the oldest, in order");
    assert_eq!(stuck.stats().overflowed.load(Ordering::Relaxed), 196);
    assert_eq!(stuck.stats().dropped(), 196);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_delivers_everything_in_order_when_the_consumer_keeps_up() {
    let (a, b) = pair().await;
    let sub = a
        .subscribe::<Event>("t/r0/event", Keep::All { queue: 256 }, || {})
        .await
        .unwrap();
    let publisher = b.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
    assert!(publisher.wait_matched(Duration::from_secs(10)).await);
    let sender = tokio::spawn(async move {
        for i in 0..200 {
            publisher.put(&reward(i as f32)).await.unwrap();
        }
        publisher
    });
    for i in 0..200u64 {
        let r = tokio::time::timeout(Duration::from_secs(10), sub.recv()).await.unwrap();
        assert_eq!(r.header.seq, i);
    }
    let _ = sender.await.unwrap();
    assert_eq!(sub.stats().dropped(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_payloads_are_counted_and_good_ones_still_arrive() {
    let (a, b) = pair().await;
    let sub = a
        .subscribe::<Event>("t/r0/event", Keep::All { queue: 16 }, || {})
        .await
        .unwrap();
    let publisher = b.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
    assert!(publisher.wait_matched(Duration::from_secs(10)).await);
    publisher.put(&reward(1.0)).await.unwrap();
    b.session().put("t/r0/event", b"garbage".to_vec()).await.unwrap();
    b.session().put("t/r0/event", b"NB\x09\x04".to_vec()).await.unwrap();
    publisher.put(&reward(2.0)).await.unwrap();
    let first = sub.recv().await;
    let second = sub.recv().await;
    assert_eq!((first.msg, second.msg), (reward(1.0), reward(2.0)));
    until("2 decode errors", || {
        sub.stats().decode_errors.load(Ordering::Relaxed) == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_context_travels_in_the_attachment() {
    let (a, b) = pair().await;
    let sub = a
        .subscribe::<Event>("t/r1/event", Keep::All { queue: 4 }, || {})
        .await
        .unwrap();
    let publisher = b.publisher::<Event>("t/r1/event", "r1", PubQos::Control).await.unwrap();
    assert!(publisher.wait_matched(Duration::from_secs(10)).await);
    let ctx = TraceContext::new_root();
    publisher.put_traced(&reward(3.0), Some(&ctx)).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap();
    assert_eq!(r.trace, Some(ctx));
    assert_eq!(r.key.as_str(), "t/r1/event");
    assert_eq!(r.header.kind, Kind::Event);
    // A message of an unsampled trace carries none.
    publisher.put_traced(&reward(4.0), None).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap();
    assert_eq!((r.msg, r.trace), (reward(4.0), None));
}

async fn open(ratio: f64) -> Bus {
    Bus::open(
        &BusConfig {
            trace_sample_ratio: ratio,
            ..BusConfig::default()
        },
        "t",
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_traces_are_sampled_at_the_configured_ratio() {
    for (ratio, want) in [(1.0, 100), (0.0, 0)] {
        let bus = open(ratio).await;
        let sub = bus
            .subscribe::<Event>("t/r0/event", Keep::All { queue: 128 }, || {})
            .await
            .unwrap();
        let publisher = bus.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
        for i in 0..100 {
            publisher.put(&reward(i as f32)).await.unwrap();
        }
        let traced = std::iter::from_fn(|| sub.take()).filter(|r| r.trace.is_some()).count();
        assert_eq!(traced, want, "ratio {ratio}");
    }
    let bad = Bus::open(
        &BusConfig {
            trace_sample_ratio: 1.5,
            ..BusConfig::default()
        },
        "t",
    )
    .await;
    let err = bad.err().expect("a ratio above 1 is refused").to_string();
    assert!(err.contains("trace_sample_ratio"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_delivers_typed_without_zenoh_and_remote_subscribers_still_get_it() {
    let (a, b) = pair().await;
    // On `a`: a typed subscriber, a raw one and a subscriber expecting another type; on `b`, a
    // remote tool.
    let typed = a
        .subscribe::<Event>("t/*/event", Keep::All { queue: 1024 }, || {})
        .await
        .unwrap();
    let raw = a
        .subscribe_raw("t/r0/**", Keep::All { queue: 1024 }, || {})
        .await
        .unwrap();
    let wrong = a
        .subscribe::<ReplayRequest>("t/r0/event", Keep::All { queue: 8 }, || {})
        .await
        .unwrap();
    let publisher = a.publisher::<Event>("t/r0/event", "r0", PubQos::Data).await.unwrap();
    assert!(
        publisher.wait_matched(Duration::from_secs(1)).await,
        "local subscribers match at once"
    );
    let ctx = TraceContext::new_root();
    publisher.put_traced(&reward(1.0), Some(&ctx)).await.unwrap();
    // Delivered in the put: nothing to wait for.
    let r = typed.take().expect("the typed subscriber has it");
    assert_eq!((r.msg, r.header.robot.as_str(), r.header.seq), (reward(1.0), "r0", 0));
    assert_eq!((r.trace, r.key.as_str()), (Some(ctx), "t/r0/event"));
    let r = raw.take().expect("the raw subscriber has it");
    let (h, m) = nanobot_messages::codec::decode::<Event>(r.payload).unwrap();
    assert_eq!((h.robot.as_str(), m, r.trace), ("r0", reward(1.0), Some(ctx)));
    assert!(wrong.take().is_none());
    assert_eq!(
        wrong.stats().decode_errors.load(Ordering::Relaxed),
        1,
        "a kind mismatch is counted"
    );
    // A remote subscriber appears: the publisher starts putting on Zenoh; the local ones still
    // get each message once.
    let remote = b
        .subscribe::<Event>("t/r0/event", Keep::All { queue: 8 }, || {})
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 2.0;
    while remote.take().is_none() {
        assert!(Instant::now() < deadline, "nothing reached the remote subscriber");
        publisher.put(&reward(i)).await.unwrap();
        i += 1.0;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let local: Vec<Event> = std::iter::from_fn(|| typed.take()).map(|r| r.msg).collect();
    assert_eq!(
        local,
        (2..i as i32).map(|v| reward(v as f32)).collect::<Vec<_>>(),
        "once each, in order"
    );
    // Dropping a subscriber undeclares it locally too.
    drop(typed);
    publisher.put(&reward(99.0)).await.unwrap();
    assert!(raw.stats().received.load(Ordering::Relaxed) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_queries_get_typed_replies_and_bad_requests_an_error() {
    let (a, b) = pair().await;
    let q = a.queryable::<ReplayRequest>("t/replay/sample", 4).await.unwrap();
    let server = tokio::spawn(async move {
        while let Some(req) = q.recv().await {
            let n = req.msg.batch_size;
            let batch = ReplayBatch {
                windows: n,
                wait: String::new(),
                tensors: vec![TensorView {
                    name: "weight".into(),
                    dtype: DType::F32,
                    shape: vec![n],
                    offset: 0,
                }],
                rows: 10,
                mean_age_s: 0.0,
                newest_stamp_ns: 0,
                intervention_share: 0.0,
                data: Blob::new(0.5f32.to_le_bytes().repeat(n as usize)),
            };
            req.reply("", &batch).await.unwrap();
            if q.stats().decode_errors.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
    });
    let req = ReplayRequest {
        batch_size: 3,
        n_obs_steps: 2,
        horizon: 16,
        seed: 1,
        held_out: false,
    };
    // Ask until the queryable is known on the other side (its declaration travels too).
    let deadline = Instant::now() + Duration::from_secs(10);
    let replies = loop {
        let replies = b
            .get::<ReplayRequest, ReplayBatch>("t/replay/sample", "", &req, Duration::from_secs(5))
            .await
            .unwrap();
        if !replies.is_empty() || Instant::now() > deadline {
            break replies;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(replies.len(), 1);
    let batch = replies.into_iter().next().unwrap().unwrap();
    assert_eq!(batch.msg.windows, 3);
    let (view, bytes) = batch.msg.tensor("weight").unwrap();
    assert_eq!(view.shape, vec![3]);
    assert_eq!(&bytes[..], &0.5f32.to_le_bytes().repeat(3)[..]);
    assert!(batch.msg.tensor("image").is_none());
    // A request of the wrong kind gets an error reply naming the expected kind.
    let wrong = b
        .get::<Event, ReplayBatch>("t/replay/sample", "", &reward(1.0), Duration::from_secs(5))
        .await
        .unwrap();
    let err = wrong.into_iter().next().unwrap().unwrap_err().to_string();
    assert!(err.contains("ReplayRequest"), "{err}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveliness_tokens_come_and_go_with_their_actor() {
    let (a, b) = pair().await;
    let token = a.liveliness_token("n1", "sim_robot_r0").await.unwrap();
    let want = vec![("n1".to_string(), "sim_robot_r0".to_string())];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut live = Vec::new();
    while live != want && Instant::now() < deadline {
        live = b.live_actors(Duration::from_secs(1)).await.unwrap();
    }
    assert_eq!(live, want);
    drop(token);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if b.live_actors(Duration::from_secs(1)).await.unwrap().is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "token still live after drop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
