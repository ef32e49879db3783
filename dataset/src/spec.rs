//! What a dataset holds: its features, and the Arrow schema and LeRobot `features` map they give.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

pub const TIMESTAMP: &str = "timestamp";
pub const FRAME_INDEX: &str = "frame_index";
pub const EPISODE_INDEX: &str = "episode_index";
pub const INDEX: &str = "index";
pub const TASK_INDEX: &str = "task_index";
pub const STATE: &str = "observation.state";
pub const ACTION: &str = "action";
pub const SURFACE: &str = "observation.surface";
/// The envelope sequence number of the observation a row came from (NanoBot's extra feature).
pub const SEQ: &str = "seq";
/// The observation's own timestamp, ns since the Unix epoch (NanoBot's extra feature).
pub const STAMP_NS: &str = "stamp_ns";
/// The robot's own episode number (from its events), which the dataset renumbers from 0.
pub const SOURCE_EPISODE: &str = "source_episode";

/// A camera stored as LeRobot's image struct `{bytes, path}` (encoded JPEG bytes, no video).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraSpec {
    /// Column name, e.g. `observation.images.camera`.
    pub key: String,
    pub height: u32,
    pub width: u32,
}

/// The features of a dataset. Stored in the manifest so that a reopened dataset keeps them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub fps: f32,
    pub robot_type: String,
    /// Task strings; a frame's `task` indexes this list.
    pub tasks: Vec<String>,
    pub state_names: Vec<String>,
    pub action_names: Vec<String>,
    pub camera: Option<CameraSpec>,
    /// `[rows, cols]` of the surface grid, stored flat (row-major) as `observation.surface`.
    pub surface: Option<[u32; 2]>,
}

impl DatasetSpec {
    /// The simulated reaching robot's dataset (`sim` crate: 6 state values, 2D action).
    pub fn sim(fps: f32, image_size: u32, surface_size: u32) -> DatasetSpec {
        DatasetSpec {
            fps,
            robot_type: "nanobot_sim".into(),
            tasks: vec!["reach the target".into()],
            state_names: ["x", "y", "vx", "vy", "target_x", "target_y"]
                .map(String::from)
                .to_vec(),
            action_names: ["ax", "ay"].map(String::from).to_vec(),
            camera: Some(CameraSpec {
                key: "observation.images.camera".into(),
                height: image_size,
                width: image_size,
            }),
            surface: Some([surface_size, surface_size]),
        }
    }

    pub fn surface_len(&self) -> usize {
        self.surface.map(|[r, c]| (r * c) as usize).unwrap_or(0)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.fps.is_finite() && self.fps > 0.0) {
            return Err(format!("fps must be positive, got {}", self.fps));
        }
        if self.tasks.is_empty() {
            return Err("at least one task is needed".into());
        }
        if self.state_names.is_empty() || self.action_names.is_empty() {
            return Err("state_names and action_names must not be empty".into());
        }
        Ok(())
    }

    /// The Arrow schema of a data file, columns in LeRobot's order.
    pub fn schema(&self) -> SchemaRef {
        let mut fields = vec![
            Field::new(TIMESTAMP, DataType::Float32, false),
            Field::new(FRAME_INDEX, DataType::Int64, false),
            Field::new(EPISODE_INDEX, DataType::Int64, false),
            Field::new(INDEX, DataType::Int64, false),
            Field::new(TASK_INDEX, DataType::Int64, false),
            Field::new(STATE, f32_list(self.state_names.len()), false),
            Field::new(ACTION, f32_list(self.action_names.len()), false),
        ];
        if let Some(cam) = &self.camera {
            fields.push(Field::new(&cam.key, image_struct(), false));
        }
        if self.surface.is_some() {
            fields.push(Field::new(SURFACE, f32_list(self.surface_len()), false));
        }
        fields.push(Field::new(SEQ, DataType::Int64, false));
        fields.push(Field::new(STAMP_NS, DataType::Int64, false));
        fields.push(Field::new(SOURCE_EPISODE, DataType::Int64, false));
        Arc::new(Schema::new(fields))
    }

    /// The `features` map of `meta/info.json`.
    pub fn features_json(&self) -> Value {
        let mut f = Map::new();
        let fps = self.fps;
        let vector = |names: &[String]| json!({"dtype": "float32", "shape": [names.len()], "names": names, "fps": fps});
        let scalar = |dtype: &str| json!({"dtype": dtype, "shape": [1], "names": null, "fps": fps});
        f.insert(STATE.into(), vector(&self.state_names));
        f.insert(ACTION.into(), vector(&self.action_names));
        if let Some(cam) = &self.camera {
            f.insert(
                cam.key.clone(),
                json!({"dtype": "image", "shape": [cam.height, cam.width, 3],
                       "names": ["height", "width", "channel"], "fps": fps}),
            );
        }
        if let Some([r, c]) = self.surface {
            f.insert(
                SURFACE.into(),
                json!({"dtype": "float32", "shape": [r * c], "names": null, "fps": fps,
                       "info": {"grid": [r, c], "layout": "row-major"}}),
            );
        }
        f.insert(TIMESTAMP.into(), scalar("float32"));
        f.insert(FRAME_INDEX.into(), scalar("int64"));
        f.insert(EPISODE_INDEX.into(), scalar("int64"));
        f.insert(INDEX.into(), scalar("int64"));
        f.insert(TASK_INDEX.into(), scalar("int64"));
        f.insert(SEQ.into(), scalar("int64"));
        f.insert(STAMP_NS.into(), scalar("int64"));
        f.insert(SOURCE_EPISODE.into(), scalar("int64"));
        Value::Object(f)
    }

    /// The features that get statistics: `(column, width)`; scalars have width 1.
    pub fn stat_features(&self) -> Vec<(&'static str, usize)> {
        let mut v = vec![
            (STATE, self.state_names.len()),
            (ACTION, self.action_names.len()),
            (TIMESTAMP, 1),
            (FRAME_INDEX, 1),
            (EPISODE_INDEX, 1),
            (INDEX, 1),
            (TASK_INDEX, 1),
        ];
        if self.surface.is_some() {
            v.push((SURFACE, self.surface_len()));
        }
        v
    }
}

pub fn f32_list(n: usize) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), n as i32)
}

/// LeRobot's (Hugging Face `datasets`') image struct.
pub fn image_struct() -> DataType {
    DataType::Struct(image_fields())
}

pub fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ])
}
