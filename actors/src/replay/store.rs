//! What replay holds: every indexed row of the fleet's datasets (one data file's columns as
//! Arrow buffers per segment, rows as references into them), per robot in recording order, with
//! weights from the robots' events; training windows are drawn from it. Runs on the replay
//! actor's own thread: nothing here is async.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use nanobot_dataset::{read_events, sha256_file, Columns, DatasetSpec, Manifest};
use nanobot_messages::{Blob, DType, Event, EventKind, ReplayBatch, ReplayRequest, TensorView};
use nanobot_sampling::{EpisodeFeedback, RateLimiter, Rng, RowKind, RowMeta, Sampler, Strategy, WeightConfig};
use serde::Deserialize;

use super::frames::FrameCache;

/// How replay samples (the replay actor's config, less its inputs).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub strategy: Strategy,
    pub weights: WeightConfig,
    /// Windows the trainer may draw per row inserted (Reverb's samples-per-insert).
    pub samples_per_insert: f64,
    /// Training rows needed before the first window.
    pub min_rows: u64,
    /// How far sampling may run ahead of the ratio, in windows.
    pub error_buffer: f64,
    /// One episode in this many is held out: never served for training, only for the
    /// held-out loss (0: none).
    pub held_out_every: u64,
    /// Memory for decoded camera frames.
    pub cache_mb: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            strategy: Strategy::Mix {
                fresh_fraction: 0.5,
                fresh_rows: 2_000,
            },
            weights: WeightConfig::default(),
            samples_per_insert: 8.0,
            min_rows: 200,
            error_buffer: 2_048.0,
            held_out_every: 10,
            cache_mb: 256.0,
        }
    }
}

/// The store's counters and sizes, copied out after every call for the actor's Stats.
#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    pub segments: u64,
    pub rows: u64,
    pub held_out_rows: u64,
    pub quarantined: u64,
    /// Segment announcements refused: a path outside the dataset roots (after resolving `..`
    /// and symlinks), not a dataset's data file, or bytes that are not the announced ones.
    pub refused_announcements: u64,
    pub intervention_rows: u64,
    pub windows_served: u64,
    pub waits: u64,
    pub decode_errors: u64,
    pub bad_event_lines: u64,
    pub events: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub ratio: f64,
}

/// What became of a data file offered to the store.
#[derive(Debug, PartialEq)]
pub enum Added {
    Rows(u64),
    /// Already indexed.
    Known,
    /// An announcement refused: nothing read, nothing moved (the reason names the path).
    Refused(String),
    /// Unreadable or not what its manifest says: moved aside (`to`, when it could be moved).
    Quarantined {
        path: PathBuf,
        reason: String,
        to: Option<PathBuf>,
    },
}

struct Segment {
    robot: u32,
    cols: Columns,
}

#[derive(Clone, Copy)]
struct RowRef {
    seg: u32,
    row: u32,
    robot: u32,
    /// Position in its robot's rows.
    pos: u32,
    held_out: bool,
    /// Index in the training (or held-out) sampler.
    slot: u32,
}

/// One robot's dataset.
struct Robot {
    name: String,
    root: PathBuf,
    spec: DatasetSpec,
    /// Global row ids, in recording order.
    rows: Vec<usize>,
    events_offset: u64,
    /// Intervention ranges `[start, end)` in the robot's sequence numbers, sorted.
    interventions: Vec<(u64, u64)>,
    intervening_since: Option<u64>,
}

/// What was said of one episode (by its source episode number).
#[derive(Default, Clone)]
struct Said {
    end_reward: Option<f32>,
    rewards: Option<f32>,
    preference: Option<i8>,
}

/// The shapes every dataset must share.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Shape {
    image: (u32, u32),
    state: usize,
    action: usize,
    surface: usize,
}

pub struct Store {
    cfg: StoreConfig,
    segments: Vec<Segment>,
    rows: Vec<RowRef>,
    robots: Vec<Robot>,
    by_root: HashMap<PathBuf, u32>,
    files: HashSet<PathBuf>,
    said: HashMap<(u32, u64), Said>,
    train: Sampler,
    train_ids: Vec<usize>,
    held: Sampler,
    held_ids: Vec<usize>,
    limiter: RateLimiter,
    weights_stale: bool,
    /// Per row: its weight in the loss, and whether the expert drove it.
    weight: Vec<f32>,
    intervention: Vec<bool>,
    frames: FrameCache,
    shape: Option<Shape>,
    stats: StoreStats,
    /// The directories datasets may be under (`index_datasets`' arguments): an announced file
    /// is opened only when, resolved, it lies below one of them.
    roots: Vec<PathBuf>,
}

impl Store {
    pub fn new(cfg: StoreConfig) -> Store {
        Store {
            train: Sampler::new(cfg.strategy),
            held: Sampler::new(Strategy::Uniform),
            limiter: RateLimiter::new(cfg.samples_per_insert, cfg.min_rows, cfg.error_buffer),
            frames: FrameCache::new((cfg.cache_mb * 1048576.0) as usize),
            cfg,
            segments: Vec::new(),
            rows: Vec::new(),
            robots: Vec::new(),
            by_root: HashMap::new(),
            files: HashSet::new(),
            said: HashMap::new(),
            train_ids: Vec::new(),
            held_ids: Vec::new(),
            weights_stale: false,
            weight: Vec::new(),
            intervention: Vec::new(),
            shape: None,
            stats: StoreStats::default(),
            roots: Vec::new(),
        }
    }

    pub fn stats(&self) -> StoreStats {
        let mut s = self.stats.clone();
        s.segments = self.segments.len() as u64;
        s.rows = self.train_ids.len() as u64;
        s.held_out_rows = self.held_ids.len() as u64;
        s.cache_bytes = self.frames.bytes() as u64;
        s.cache_hits = self.frames.hits;
        s.cache_misses = self.frames.misses;
        s.ratio = self.limiter.ratio();
        s
    }

    /// Index every finalized file of the datasets under `dir`: `dir` itself when it is a
    /// dataset, else each of its subdirectories that is one (a fleet's `data/{fleet}`). Files
    /// in manifest order; a missing `dir` holds none.
    pub fn index_datasets(&mut self, dir: &Path) -> Vec<Result<Added, String>> {
        if !self.roots.iter().any(|r| r == dir) {
            self.roots.push(dir.to_path_buf());
        }
        let mut roots = Vec::new();
        if Manifest::path(dir).exists() {
            roots.push(dir.to_path_buf());
        } else if let Ok(entries) = std::fs::read_dir(dir) {
            let mut subs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            subs.sort();
            roots.extend(subs.into_iter().filter(|p| Manifest::path(p).exists()));
        }
        let mut out = Vec::new();
        for root in roots {
            let manifest = match Manifest::load(&root) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    out.push(Err(e.to_string()));
                    continue;
                }
            };
            for f in &manifest.files {
                out.push(self.add_file(&root.join(&f.path), Some(&f.sha256)));
            }
        }
        out
    }

    /// A data file a logger announced on the bus. The message is not trusted for anything but a
    /// name to look at: the path must resolve (`..` and symlinks followed) to a regular file
    /// below one of the dataset roots, in a dataset's `data/chunk-…/` directory; its bytes are
    /// checked against the dataset's own manifest when it lists the file (and quarantined on a
    /// mismatch, as at start), else against the announced sha256, and then a mismatch only
    /// refuses it: a bus message never moves a file.
    pub fn add_announced(&mut self, path: &Path, sha256: &str) -> Result<Added, String> {
        let mut refuse = |why: String| {
            self.stats.refused_announcements += 1;
            Ok(Added::Refused(format!("{}: {why}", path.display())))
        };
        let file = match path.canonicalize() {
            Ok(f) => f,
            Err(e) => return refuse(format!("cannot be resolved: {e}")),
        };
        let below = self
            .roots
            .iter()
            .filter_map(|r| r.canonicalize().ok())
            .any(|r| file.starts_with(&r));
        if !below {
            return refuse(format!("{} is outside the dataset roots", file.display()));
        }
        if !std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file()) {
            return refuse("not a regular file".into());
        }
        let Some(root) = dataset_root(&file) else {
            return refuse("not a dataset's data file (DATASET/data/chunk-…/file)".into());
        };
        if self.files.contains(&file) {
            return Ok(Added::Known);
        }
        // `root` comes from the resolved path, so the file's place in it is the manifest's.
        let rel = file.strip_prefix(&root).unwrap_or(&file);
        let listed = Manifest::load(&root).ok().flatten().and_then(|m| {
            m.files
                .iter()
                .find(|f| Path::new(&f.path) == rel)
                .map(|f| f.sha256.clone())
        });
        match listed {
            Some(sha) => self.add_file(&file, Some(&sha)),
            None => {
                let got = match sha256_file(&file) {
                    Ok((got, _)) => got,
                    Err(e) => return refuse(e.to_string()),
                };
                if got != sha256 {
                    return refuse(format!("sha256 {got}, announced as {sha256}; not in its manifest"));
                }
                self.add_file(&file, Some(&got))
            }
        }
    }

    /// Index one finalized data file (`{root}/data/chunk-…/file-….parquet`), checking its
    /// sha256 against `sha256` (what its SegmentFinalized or manifest said). A file that fails
    /// is quarantined; an error is a dataset that cannot be indexed at all.
    pub fn add_file(&mut self, path: &Path, sha256: Option<&str>) -> Result<Added, String> {
        let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        if self.files.contains(&key) {
            return Ok(Added::Known);
        }
        let root = dataset_root(path).ok_or_else(|| format!("{}: not a dataset's data file", path.display()))?;
        let robot = self.robot(&root)?;
        let spec = self.robots[robot as usize].spec.clone();
        let checked = (|| -> Result<Columns, String> {
            if let Some(want) = sha256 {
                let (got, _) = sha256_file(path).map_err(|e| e.to_string())?;
                if got != want {
                    return Err(format!("sha256 {got}, its manifest says {want}"));
                }
            }
            Columns::read(path, &spec).map_err(|e| e.to_string())
        })();
        let cols = match checked {
            Ok(c) => c,
            Err(reason) => {
                self.stats.quarantined += 1;
                self.files.insert(key);
                let to = quarantine(&root, path);
                return Ok(Added::Quarantined {
                    path: path.to_path_buf(),
                    reason,
                    to,
                });
            }
        };
        self.files.insert(key);
        let n = cols.rows;
        let seg = self.segments.len() as u32;
        self.segments.push(Segment { robot, cols });
        for row in 0..n {
            self.push_row(seg, row as u32);
        }
        self.read_events(robot);
        self.weights_stale = true;
        Ok(Added::Rows(n as u64))
    }

    /// The robot whose dataset is at `root`, registered on first sight (its features must
    /// match the datasets already held).
    fn robot(&mut self, root: &Path) -> Result<u32, String> {
        if let Some(r) = self.by_root.get(root) {
            return Ok(*r);
        }
        let manifest = Manifest::load(root)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{}: no manifest: not a NanoBot dataset", root.display()))?;
        let spec = manifest.spec;
        let shape = Shape {
            image: spec.camera.as_ref().map_or((0, 0), |c| (c.width, c.height)),
            state: spec.state_names.len(),
            action: spec.action_names.len(),
            surface: spec.surface_len(),
        };
        match self.shape {
            None => self.shape = Some(shape),
            Some(s) if s != shape => {
                return Err(format!(
                    "{}: features {shape:?} differ from the datasets already held ({s:?})",
                    root.display()
                ))
            }
            _ => {}
        }
        if shape.image == (0, 0) {
            return Err(format!(
                "{}: the dataset has no camera; the policy needs one",
                root.display()
            ));
        }
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let id = self.robots.len() as u32;
        self.robots.push(Robot {
            name,
            root: root.to_path_buf(),
            spec,
            rows: Vec::new(),
            events_offset: 0,
            interventions: Vec::new(),
            intervening_since: None,
        });
        self.by_root.insert(root.to_path_buf(), id);
        Ok(id)
    }

    fn push_row(&mut self, seg: u32, row: u32) {
        let s = &self.segments[seg as usize];
        let robot = s.robot;
        let task = s.cols.task_index[row as usize].max(0) as u32;
        let episode = s.cols.episode_index[row as usize];
        let r = &mut self.robots[robot as usize];
        let held_out =
            self.cfg.held_out_every > 0 && episode_hash(&r.name, episode).is_multiple_of(self.cfg.held_out_every);
        let id = self.rows.len();
        let meta = RowMeta {
            robot,
            task,
            inserted: id as u64,
            weight: 1.0,
        };
        let slot = if held_out {
            self.held.push(meta);
            self.held_ids.push(id);
            self.held_ids.len() - 1
        } else {
            self.train.push(meta);
            self.train_ids.push(id);
            self.limiter.insert(1);
            self.train_ids.len() - 1
        };
        self.rows.push(RowRef {
            seg,
            row,
            robot,
            pos: r.rows.len() as u32,
            held_out,
            slot: slot as u32,
        });
        r.rows.push(id);
        self.weight.push(1.0);
        self.intervention.push(false);
    }

    /// Take in the events the robot's logger wrote since the last read.
    fn read_events(&mut self, robot: u32) {
        let r = &self.robots[robot as usize];
        let (events, next, bad) = match read_events(&r.root, r.events_offset) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(robot = %r.name, "events not read: {e}");
                return;
            }
        };
        self.stats.bad_event_lines += bad as u64;
        self.robots[robot as usize].events_offset = next;
        for e in events {
            match serde_json::from_value::<Event>(e.event) {
                Ok(ev) => self.apply(robot, e.seq, ev),
                Err(_) => self.stats.bad_event_lines += 1,
            }
        }
    }

    /// An event of `robot` stamped with its sequence number `seq`.
    fn apply(&mut self, robot: u32, seq: u64, ev: Event) {
        self.stats.events += 1;
        self.weights_stale = true;
        let r = &mut self.robots[robot as usize];
        let said = self.said.entry((robot, ev.episode)).or_default();
        match ev.event {
            EventKind::Intervention { active: true, .. } => {
                r.intervening_since.get_or_insert(seq);
            }
            EventKind::Intervention { active: false, .. } => {
                if let Some(start) = r.intervening_since.take() {
                    let at = r.interventions.partition_point(|(s, _)| *s < start);
                    r.interventions.insert(at, (start, seq.max(start)));
                }
            }
            EventKind::EpisodeEnd { reward, .. } => said.end_reward = Some(reward),
            EventKind::Reward { value } => *said.rewards.get_or_insert(0.0) += value,
            EventKind::Preference { score } => said.preference = Some(score),
            EventKind::EpisodeStart { .. } => {}
        }
    }

    /// Recompute every row's weight from what was said (after new events or rows).
    fn reweigh(&mut self) {
        if !self.weights_stale {
            return;
        }
        self.weights_stale = false;
        let returns: Vec<f32> = self.said.values().filter_map(total_reward).collect();
        let baseline = if returns.is_empty() {
            0.0
        } else {
            returns.iter().sum::<f32>() / returns.len() as f32
        };
        let w = &self.cfg.weights;
        let mut intervention_rows = 0;
        for r in &self.robots {
            let mut ranges = r.interventions.clone();
            if let Some(s) = r.intervening_since {
                ranges.push((s, u64::MAX));
            }
            for &id in &r.rows {
                let row = self.rows[id];
                let c = &self.segments[row.seg as usize].cols;
                let (seq, ep) = (
                    c.seq[row.row as usize] as u64,
                    c.source_episode[row.row as usize] as u64,
                );
                let kind = w.kind_in(seq, &ranges);
                intervention_rows += u64::from(kind == RowKind::Intervention);
                let factor = self.said.get(&(row.robot, ep)).map_or(1.0, |s| {
                    w.episode_factor(
                        &EpisodeFeedback {
                            interventions: Vec::new(),
                            reward: total_reward(s),
                            preference: s.preference,
                        },
                        baseline,
                    )
                });
                let weight = w.weight(kind, factor).max(0.0);
                self.weight[id] = weight;
                self.intervention[id] = kind == RowKind::Intervention;
                // The strategy decides what is drawn (a row that weighs 0 never is); the weight
                // scales the window's loss (intervention-weighted and advantage-weighted
                // regression).
                let drawable = if weight > 0.0 { 1.0 } else { 0.0 };
                if row.held_out {
                    self.held.set_weight(row.slot as usize, drawable);
                } else {
                    self.train.set_weight(row.slot as usize, drawable);
                }
            }
        }
        self.stats.intervention_rows = intervention_rows;
    }

    /// Row `id`'s neighbour `k` steps away within its episode, and whether it is really there
    /// (else the nearest row of the episode stands in: padding).
    fn neighbour(&self, id: usize, k: isize) -> (usize, bool) {
        let row = self.rows[id];
        let r = &self.robots[row.robot as usize];
        let episode = |pos: usize| {
            let x = self.rows[r.rows[pos]];
            self.segments[x.seg as usize].cols.episode_index[x.row as usize]
        };
        let (p, ep) = (row.pos as usize, episode(row.pos as usize));
        let target = p as isize + k;
        let mut q = p;
        while (q as isize) < target && q + 1 < r.rows.len() && episode(q + 1) == ep {
            q += 1;
        }
        while (q as isize) > target && q > 0 && episode(q - 1) == ep {
            q -= 1;
        }
        (r.rows[q], q as isize == target)
    }

    /// Training windows for `req` (held-out ones when it asks): drawn by the strategy and the
    /// rows' weights with `req.seed`, so the same request over the same rows gives the same
    /// windows. An error is a request that cannot be served as asked.
    pub fn sample(&mut self, req: &ReplayRequest, now_ns: u64) -> Result<ReplayBatch, String> {
        let (b, t, h) = (req.batch_size as usize, req.n_obs_steps as usize, req.horizon as usize);
        if !(1..=4096).contains(&b) || !(1..=16).contains(&t) || !(1..=1024).contains(&h) {
            return Err(format!(
                "batch_size {b}, n_obs_steps {t}, horizon {h}: each must be positive (at most 4096, 16, 1024)"
            ));
        }
        self.reweigh();
        if !req.held_out && !self.limiter.try_sample(b as u64) {
            self.stats.waits += 1;
            let need = self.limiter.inserts_needed(b as u64);
            return Ok(waiting(
                format!("rate limit: {need} more rows before {b} more windows"),
                self.train_ids.len() as u64,
            ));
        }
        let mut rng = Rng::new(req.seed);
        let (sampler, ids) = if req.held_out {
            (&mut self.held, &self.held_ids)
        } else {
            (&mut self.train, &self.train_ids)
        };
        let starts: Vec<usize> = sampler.sample(b, &mut rng).into_iter().map(|s| ids[s]).collect();
        if starts.len() < b {
            self.stats.waits += 1;
            let what = if req.held_out { "held-out" } else { "training" };
            return Ok(waiting(
                format!("no {what} rows to draw from yet"),
                self.train_ids.len() as u64,
            ));
        }
        let batch = self.windows(&starts, t, h, now_ns);
        self.stats.windows_served += b as u64;
        Ok(batch)
    }

    fn windows(&mut self, starts: &[usize], t: usize, h: usize, now_ns: u64) -> ReplayBatch {
        let shape = self.shape.expect("rows imply a shape");
        let (w, hgt) = (shape.image.0 as usize, shape.image.1 as usize);
        let b = starts.len();
        // Which rows each window reads.
        let mut obs_rows = Vec::with_capacity(b * t);
        let mut obs_pad = Vec::with_capacity(b * t);
        let mut act_rows = Vec::with_capacity(b * h);
        let mut mask = Vec::with_capacity(b * h);
        for &id in starts {
            for k in 0..t {
                let (r, real) = self.neighbour(id, k as isize - (t as isize - 1));
                obs_rows.push(r);
                obs_pad.push(u8::from(!real));
            }
            for k in 0..h {
                let (r, real) = self.neighbour(id, k as isize);
                act_rows.push(r);
                mask.push(if real { 1f32 } else { 0.0 });
            }
        }
        let (rows, segments) = (&self.rows, &self.segments);
        let frames = self.frames.get(
            &obs_rows,
            |id| {
                let x = rows[id];
                segments[x.seg as usize].cols.image(x.row as usize)
            },
            |jpeg| match nanobot_policy::preprocess::decode_jpeg_rgb(jpeg) {
                Ok((fw, fh, rgb)) if (fw as usize, fh as usize) == (w, hgt) => Ok(rgb),
                Ok((fw, fh, _)) => Err(format!("image is {fw}×{fh}, the dataset says {w}×{hgt}")),
                Err(e) => Err(e.to_string()),
            },
        );
        let mut out = BatchWriter::default();
        let mut weights: Vec<f32> = starts.iter().map(|&id| self.weight[id]).collect();
        let plane = w * hgt;
        let image = out.tensor("image", DType::U8, &[b, t, 3, hgt, w]);
        for (i, f) in frames.iter().enumerate() {
            match f {
                Ok(rgb) => {
                    for ch in 0..3 {
                        image.extend(rgb.iter().skip(ch).step_by(3));
                    }
                }
                Err(e) => {
                    self.stats.decode_errors += 1;
                    weights[i / t] = 0.0;
                    let x = self.rows[obs_rows[i]];
                    tracing::warn!(robot = %self.robots[x.robot as usize].name, row = x.row, "frame not decoded, its window weighs 0: {e}");
                    image.extend(std::iter::repeat_n(0u8, 3 * plane));
                }
            }
        }
        let cols = |id: usize| {
            let x = self.rows[id];
            (&self.segments[x.seg as usize].cols, x.row as usize)
        };
        out.floats(
            "state",
            &[b, t, shape.state],
            obs_rows.iter().map(|&id| {
                let (c, r) = cols(id);
                c.state.row(r)
            }),
        );
        out.floats(
            "surface",
            &[b, t, shape.surface],
            obs_rows.iter().map(|&id| {
                let (c, r) = cols(id);
                c.surface.as_ref().map_or(&[][..], |s| s.row(r))
            }),
        );
        let tasks: Vec<u32> = starts
            .iter()
            .map(|&id| {
                let (c, r) = cols(id);
                c.task_index[r].max(0) as u32
            })
            .collect();
        out.put("task", DType::U32, &[b], tasks.iter().flat_map(|v| v.to_le_bytes()));
        out.floats(
            "action",
            &[b, h, shape.action],
            act_rows.iter().map(|&id| {
                let (c, r) = cols(id);
                c.action.row(r)
            }),
        );
        out.put(
            "action_mask",
            DType::F32,
            &[b, h],
            mask.iter().flat_map(|v| v.to_le_bytes()),
        );
        out.put("obs_pad", DType::U8, &[b, t], obs_pad.iter().copied());
        out.put("weight", DType::F32, &[b], weights.iter().flat_map(|v| v.to_le_bytes()));
        // Where the windows come from.
        let stamps: Vec<u64> = starts
            .iter()
            .map(|&id| {
                let (c, r) = cols(id);
                c.stamp_ns[r].max(0) as u64
            })
            .collect();
        let mean_age_s = stamps
            .iter()
            .map(|s| now_ns.saturating_sub(*s) as f64 / 1e9)
            .sum::<f64>()
            / b as f64;
        let interventions = starts.iter().filter(|&&id| self.intervention[id]).count();
        ReplayBatch {
            windows: b as u32,
            wait: String::new(),
            tensors: out.views,
            rows: self.train_ids.len() as u64,
            mean_age_s: mean_age_s as f32,
            newest_stamp_ns: stamps.iter().copied().max().unwrap_or(0),
            intervention_share: interventions as f32 / b as f32,
            data: Blob::new(out.data),
        }
    }
}

fn total_reward(s: &Said) -> Option<f32> {
    match (s.end_reward, s.rewards) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
    }
}

fn waiting(why: String, rows: u64) -> ReplayBatch {
    ReplayBatch {
        windows: 0,
        wait: why,
        tensors: Vec::new(),
        rows,
        mean_age_s: 0.0,
        newest_stamp_ns: 0,
        intervention_share: 0.0,
        data: Blob::default(),
    }
}

/// `{root}` of `{root}/data/chunk-…/file-….parquet`.
fn dataset_root(file: &Path) -> Option<PathBuf> {
    let chunk = file.parent()?;
    let data = chunk.parent()?;
    (data.file_name()? == "data").then(|| data.parent().map(Path::to_path_buf))?
}

/// Move a bad data file to `{root}/quarantine/` (named after its chunk and file); where it went,
/// if it could be moved.
fn quarantine(root: &Path, file: &Path) -> Option<PathBuf> {
    let dir = root.join("quarantine");
    let chunk = file.parent()?.file_name()?.to_string_lossy().into_owned();
    let name = file.file_name()?.to_string_lossy().into_owned();
    let to = dir.join(format!("{chunk}-{name}"));
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::rename(file, &to).ok()?;
    Some(to)
}

/// FNV-1a of a robot's name and an episode number: which episodes are held out, the same on
/// every run.
fn episode_hash(robot: &str, episode: i64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in robot.bytes().chain(episode.to_le_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A batch's blob and its tensor table, written tensor by tensor.
#[derive(Default)]
struct BatchWriter {
    views: Vec<TensorView>,
    data: Vec<u8>,
}

impl BatchWriter {
    /// Start tensor `name`; its bytes are what is then pushed into the returned buffer.
    fn tensor(&mut self, name: &str, dtype: DType, shape: &[usize]) -> &mut Vec<u8> {
        self.views.push(TensorView {
            name: name.into(),
            dtype,
            shape: shape.iter().map(|d| *d as u32).collect(),
            offset: self.data.len() as u64,
        });
        &mut self.data
    }

    fn put(&mut self, name: &str, dtype: DType, shape: &[usize], bytes: impl Iterator<Item = u8>) {
        self.tensor(name, dtype, shape).extend(bytes);
    }

    /// Rows of f32 values straight from the columns' buffers.
    fn floats<'a>(&mut self, name: &str, shape: &[usize], rows: impl Iterator<Item = &'a [f32]>) {
        let buf = self.tensor(name, DType::F32, shape);
        for r in rows {
            for v in r {
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use nanobot_dataset::{EventLog, StoredEvent};

    use super::*;

    use super::super::fixtures::{dataset, EP_LEN};

    fn cfg() -> StoreConfig {
        StoreConfig {
            strategy: Strategy::Uniform,
            samples_per_insert: 1e9,
            min_rows: 1,
            held_out_every: 0,
            ..StoreConfig::default()
        }
    }

    fn req(batch: u32, t: u32, h: u32, seed: u64) -> ReplayRequest {
        ReplayRequest {
            batch_size: batch,
            n_obs_steps: t,
            horizon: h,
            seed,
            held_out: false,
        }
    }

    fn floats(b: &ReplayBatch, name: &str) -> Vec<f32> {
        let (_, bytes) = b.tensor(name).unwrap();
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn windows_at_episode_edges_are_padded_and_masked_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r0");
        // 3 episodes of 5 rows in files of 4: episodes span files.
        dataset(&root, 0..15, 4);
        let mut s = Store::new(cfg());
        let added = s.index_datasets(dir.path());
        assert_eq!(added.len(), 4);
        assert_eq!(s.stats().rows, 15);
        let (t, h) = (2usize, 4usize);
        let b = s.sample(&req(64, t as u32, h as u32, 7), 2_000).unwrap();
        assert_eq!(b.windows, 64);
        let (state, action, mask) = (floats(&b, "state"), floats(&b, "action"), floats(&b, "action_mask"));
        let (_, pad) = b.tensor("obs_pad").unwrap();
        let (_, image) = b.tensor("image").unwrap();
        assert_eq!(image.len(), 64 * t * 3 * 64 * 64);
        let mut starts_seen = std::collections::HashSet::new();
        for w in 0..64 {
            let start = state[(w * t + t - 1) * 6] as u64;
            starts_seen.insert(start);
            let (first, ep) = (start - start % EP_LEN, start / EP_LEN);
            // Observation history: the row before, or the episode's first row repeated as padding.
            let prev = state[w * t * 6] as u64;
            let at_start = start == first;
            assert_eq!(prev, if at_start { start } else { start - 1 }, "window at {start}");
            assert_eq!(pad[w * t], u8::from(at_start));
            assert_eq!(pad[w * t + 1], 0);
            for k in 0..h as u64 {
                let a = action[(w * h + k as usize) * 2] as u64;
                let real = (start + k) / EP_LEN == ep && start + k < 15;
                assert_eq!(
                    a,
                    if real { start + k } else { first + EP_LEN - 1 },
                    "window {start} step {k}"
                );
                assert_eq!(mask[w * h + k as usize], if real { 1.0 } else { 0.0 });
            }
        }
        assert!(starts_seen.len() > 10, "draws cover the rows: {starts_seen:?}");
        // The same request over the same rows gives the same windows.
        let again = s.sample(&req(64, t as u32, h as u32, 7), 2_000).unwrap();
        assert_eq!(again.data.to_bytes(), b.data.to_bytes());
    }

    fn event(seq: u64, episode: u64, kind: EventKind) -> StoredEvent {
        StoredEvent {
            seq,
            stamp_ns: 0,
            event: serde_json::to_value(Event { episode, event: kind }).unwrap(),
        }
    }

    #[test]
    fn weights_follow_interventions_rewards_and_preferences() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r0");
        dataset(&root, 0..20, 100);
        // Episode 0: the expert drove seqs 3 and 4. Episode 1: a thumbs-down. Episodes 2, 3:
        // rewards 1 and 0.
        EventLog::open(&root)
            .unwrap()
            .append(&[
                event(
                    3,
                    0,
                    EventKind::Intervention {
                        active: true,
                        reason: "test".into(),
                    },
                ),
                event(
                    5,
                    1,
                    EventKind::Intervention {
                        active: false,
                        reason: "test".into(),
                    },
                ),
                event(9, 1, EventKind::Preference { score: -1 }),
                event(
                    14,
                    2,
                    EventKind::EpisodeEnd {
                        success: true,
                        steps: 5,
                        reward: 1.0,
                    },
                ),
                event(
                    19,
                    3,
                    EventKind::EpisodeEnd {
                        success: false,
                        steps: 5,
                        reward: 0.0,
                    },
                ),
            ])
            .unwrap();
        let mut s = Store::new(StoreConfig {
            weights: WeightConfig {
                pre_intervention_steps: 2,
                pre_intervention: 0.5,
                ..WeightConfig::default()
            },
            ..cfg()
        });
        s.index_datasets(dir.path());
        let b = s.sample(&req(400, 1, 1, 3), 0).unwrap();
        let (state, weight) = (floats(&b, "state"), floats(&b, "weight"));
        let e = (0.5f32).exp();
        for (w, seq) in weight.iter().zip(state.iter().step_by(6).map(|v| *v as u64)) {
            let want = match seq {
                0 => 1.0,
                1 | 2 => 0.5,
                3 | 4 => 2.0,
                5..=9 => panic!("a thumbs-down episode is never drawn (row {seq})"),
                10..=14 => e,
                _ => 1.0 / e,
            };
            assert!((w - want).abs() < 1e-5, "row {seq}: weight {w}, want {want}");
        }
        let share = b.intervention_share;
        assert!((share - 2.0 / 15.0).abs() < 0.06, "intervention share {share}");
        assert_eq!(s.stats().intervention_rows, 2);
    }

    #[test]
    fn a_corrupt_segment_is_quarantined_and_sampling_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r0");
        dataset(&root, 0..10, 5);
        let m = Manifest::load(&root).unwrap().unwrap();
        let bad = root.join(&m.files[1].path);
        let mut bytes = std::fs::read(&bad).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        std::fs::write(&bad, bytes).unwrap();
        let mut s = Store::new(cfg());
        let added = s.index_datasets(dir.path());
        assert_eq!(added[0], Ok(Added::Rows(5)));
        match &added[1] {
            Ok(Added::Quarantined {
                reason, to: Some(to), ..
            }) => {
                assert!(reason.contains("sha256"), "{reason}");
                assert!(to.exists() && !bad.exists(), "moved aside to {}", to.display());
            }
            other => panic!("not quarantined: {other:?}"),
        }
        assert_eq!(s.stats().quarantined, 1);
        // A missing file announced later is quarantined too (nothing to move).
        let gone = s.add_file(&root.join("data/chunk-000/file-009.parquet"), Some("00"));
        assert!(matches!(gone, Ok(Added::Quarantined { to: None, .. })), "{gone:?}");
        let b = s.sample(&req(16, 2, 4, 1), 0).unwrap();
        assert_eq!(b.windows, 16);
        assert!(floats(&b, "state").iter().step_by(6).all(|seq| *seq < 5.0));
        // Offered again, a known file is not indexed twice.
        assert_eq!(s.add_file(&root.join(&m.files[0].path), None), Ok(Added::Known));
    }

    #[test]
    fn an_announcement_outside_the_roots_or_with_forged_bytes_reads_and_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (roots, elsewhere) = (dir.path().join("data"), dir.path().join("elsewhere"));
        let root = roots.join("r0");
        dataset(&root, 0..10, 5);
        let m = Manifest::load(&root).unwrap().unwrap();
        let mut s = Store::new(cfg());
        s.index_datasets(&roots);
        let indexed = s.stats().rows + s.stats().held_out_rows;
        // A dataset of the same shape outside the roots, a symlink into it from inside, a
        // `..` path out, and a system file.
        dataset(&elsewhere.join("r1"), 0..10, 5);
        let outside = elsewhere.join("r1").join(&m.files[0].path);
        let link = root.join("data/chunk-000/file-900.parquet");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let dotdot = root
            .join("data/chunk-000/../../../../elsewhere/r1")
            .join(&m.files[1].path);
        for (path, why) in [
            (PathBuf::from("/etc/passwd"), "outside the dataset roots"),
            (outside.clone(), "outside the dataset roots"),
            (link.clone(), "outside the dataset roots"),
            (dotdot, "outside the dataset roots"),
            (root.join("meta/manifest.json"), "not a dataset's data file"),
            (root.join("data/chunk-000/file-404.parquet"), "cannot be resolved"),
        ] {
            match s.add_announced(&path, "00") {
                Ok(Added::Refused(r)) => assert!(r.contains(why), "{}: {r}", path.display()),
                other => panic!("{} not refused: {other:?}", path.display()),
            }
        }
        assert!(outside.exists() && link.exists(), "nothing moved");
        // A new file inside the roots, not yet in its manifest, announced with the wrong
        // sha256: refused, and left where it is.
        let fresh = root.join("data/chunk-000/file-777.parquet");
        std::fs::copy(root.join(&m.files[0].path), &fresh).unwrap();
        assert!(matches!(s.add_announced(&fresh, "00"), Ok(Added::Refused(_))));
        assert!(fresh.exists(), "a bus message never moves a file");
        // The same file with its real sha256 is indexed; a file its manifest lists is checked
        // against the manifest, whatever the message claims.
        let (sha, _) = sha256_file(&fresh).unwrap();
        assert!(matches!(s.add_announced(&fresh, &sha), Ok(Added::Rows(5))));
        assert_eq!(s.add_announced(&root.join(&m.files[1].path), "00"), Ok(Added::Known));
        assert_eq!(s.stats().refused_announcements, 7);
        assert_eq!(s.stats().rows + s.stats().held_out_rows, indexed + 5);
        assert_eq!(s.stats().quarantined, 0);
        // A store that started before the dataset existed: a file its manifest lists is checked
        // against the manifest, whatever sha256 the announcement claims.
        let later = tempfile::tempdir().unwrap();
        let mut s = Store::new(cfg());
        s.index_datasets(later.path());
        dataset(&later.path().join("r0"), 0..10, 5);
        let listed = later.path().join("r0").join(&m.files[0].path);
        assert_eq!(s.add_announced(&listed, "00"), Ok(Added::Rows(5)));
    }

    #[test]
    fn the_rate_limiter_holds_the_trainer_to_its_ratio_and_held_out_episodes_stay_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("r0");
        dataset(&root, 0..100, 50);
        let mut s = Store::new(StoreConfig {
            samples_per_insert: 1.0,
            error_buffer: 0.0,
            min_rows: 10,
            held_out_every: 4,
            ..cfg()
        });
        s.index_datasets(dir.path());
        let st = s.stats();
        assert_eq!(st.rows + st.held_out_rows, 100);
        assert!(st.held_out_rows >= 5 && st.held_out_rows <= 50, "{st:?}");
        let held: std::collections::HashSet<u64> = floats(
            &s.sample(
                &ReplayRequest {
                    held_out: true,
                    ..req(200, 1, 1, 2)
                },
                0,
            )
            .unwrap(),
            "state",
        )
        .iter()
        .step_by(6)
        .map(|v| *v as u64 / EP_LEN)
        .collect();
        let mut served = 0;
        loop {
            let b = s.sample(&req(10, 1, 1, served), 0).unwrap();
            if b.windows == 0 {
                assert!(b.wait.contains("rate limit"), "{}", b.wait);
                break;
            }
            served += 10;
            for seq in floats(&b, "state").iter().step_by(6) {
                assert!(
                    !held.contains(&(*seq as u64 / EP_LEN)),
                    "a held-out episode was served for training"
                );
            }
        }
        assert_eq!(served, st.rows / 10 * 10, "one window per row inserted");
    }
}
