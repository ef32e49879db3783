//! The policy's configuration (`configs/policy/*.toml`): it travels inside every checkpoint,
//! so a file is only ever loaded into the model it was made for.

use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConfigError {
    #[error("policy config {file}: {reason}")]
    Invalid { file: String, reason: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    /// Spatial-softmax keypoints (Levine et al. 2016; Diffusion Policy's image encoder): each
    /// keypoint scores every pixel by its colour, a softmax over the frame turns the scores
    /// into an expected (x, y), and the 2K numbers join the robot's state in the sensor token,
    /// as Diffusion Policy joins its image features to the state: where a thing is in the
    /// frame, to the pixel, which 16-pixel patches blur. 0: none.
    #[serde(default)]
    pub keypoints: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrunkConfig {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    /// Observations of history the trunk sees.
    pub n_obs_steps: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputsConfig {
    pub state_dim: usize,
    pub surface_rows: usize,
    pub surface_cols: usize,
    /// Side of the square surface patches that become tokens.
    pub surface_patch: usize,
    pub n_tasks: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    pub action_dim: usize,
    /// Actions predicted per chunk.
    pub horizon: usize,
    /// Actions executed per chunk (receding horizon).
    pub n_action_steps: usize,
    pub hidden: usize,
    pub depth: usize,
    pub train_steps: usize,
    pub ddim_steps: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Which parts get adapters: "vision" (the encoder's attention, MLP, projector and keypoint
    /// scorer), "sensor" (the sensor token's MLP, which reads the state and the keypoints),
    /// "trunk", "head".
    pub targets: Vec<String>,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
    pub fn targets(&self, part: &str) -> bool {
        self.targets.iter().any(|t| t == part)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    pub vision: VisionConfig,
    pub trunk: TrunkConfig,
    pub inputs: InputsConfig,
    pub head: HeadConfig,
    pub lora: LoraConfig,
}

impl PolicyConfig {
    pub fn from_toml(file: &str, text: &str) -> Result<Self, ConfigError> {
        let cfg: PolicyConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            file: file.to_string(),
            reason: match e.span() {
                Some(s) => format!("line {}: {}", text[..s.start].matches('\n').count() + 1, e.message()),
                None => e.message().to_string(),
            },
        })?;
        cfg.validate().map_err(|reason| ConfigError::Invalid {
            file: file.to_string(),
            reason,
        })?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        Self::from_toml(&file, &text)
    }

    /// Checks the sizes fit together; the reason names the field.
    pub fn validate(&self) -> Result<(), String> {
        let v = &self.vision;
        let positive = [
            ("vision.patch", v.patch),
            ("vision.dim", v.dim),
            ("vision.heads", v.heads),
            ("trunk.width", self.trunk.width),
            ("trunk.heads", self.trunk.heads),
            ("trunk.n_obs_steps", self.trunk.n_obs_steps),
            ("inputs.state_dim", self.inputs.state_dim),
            ("inputs.surface_patch", self.inputs.surface_patch),
            ("inputs.n_tasks", self.inputs.n_tasks),
            ("head.action_dim", self.head.action_dim),
            ("head.horizon", self.head.horizon),
            ("head.n_action_steps", self.head.n_action_steps),
            ("head.hidden", self.head.hidden),
            ("head.train_steps", self.head.train_steps),
            ("head.ddim_steps", self.head.ddim_steps),
            ("lora.rank", self.lora.rank),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, x)| *x == 0) {
            return Err(format!("{name} must be positive"));
        }
        if 2 * v.keypoints > self.trunk.width {
            return Err(format!(
                "vision.keypoints {} needs a trunk.width of at least {}",
                v.keypoints,
                2 * v.keypoints
            ));
        }
        if !v.image_size.is_multiple_of(v.patch) {
            return Err(format!(
                "vision.image_size {} is not a multiple of vision.patch {}",
                v.image_size, v.patch
            ));
        }
        if !v.dim.is_multiple_of(v.heads) || !self.trunk.width.is_multiple_of(self.trunk.heads) {
            return Err("vision.dim and trunk.width must be multiples of their heads".into());
        }
        let i = &self.inputs;
        if !i.surface_rows.is_multiple_of(i.surface_patch) || !i.surface_cols.is_multiple_of(i.surface_patch) {
            return Err("inputs.surface_rows and surface_cols must be multiples of inputs.surface_patch".into());
        }
        if self.head.n_action_steps > self.head.horizon {
            return Err("head.n_action_steps cannot exceed head.horizon".into());
        }
        if self.head.ddim_steps > self.head.train_steps {
            return Err("head.ddim_steps cannot exceed head.train_steps".into());
        }
        if let Some(t) = self
            .lora
            .targets
            .iter()
            .find(|t| !["vision", "sensor", "trunk", "head"].contains(&t.as_str()))
        {
            return Err(format!(
                "lora.targets: unknown part {t:?} (vision, sensor, trunk, head)"
            ));
        }
        Ok(())
    }

    /// The ViT's tokens per frame, one per patch: the frame's tokens in the trunk.
    pub fn image_tokens(&self) -> usize {
        (self.vision.image_size / self.vision.patch).pow(2)
    }
    /// Rows of `trunk.width` floats the vision tower makes of a frame: its tokens, and with
    /// keypoints one more row that carries their 2K coordinates (zero-padded), which go to
    /// the sensor token.
    pub fn frame_rows(&self) -> usize {
        self.image_tokens() + usize::from(self.vision.keypoints > 0)
    }
    /// What the sensor token reads: the state, then the keypoints' (x, y).
    pub fn sensor_inputs(&self) -> usize {
        self.inputs.state_dim + 2 * self.vision.keypoints
    }
    pub fn surface_tokens(&self) -> usize {
        let i = &self.inputs;
        (i.surface_rows / i.surface_patch) * (i.surface_cols / i.surface_patch)
    }
    /// Tokens per observation step: image patches, sensor, surface patches, task.
    pub fn tokens_per_step(&self) -> usize {
        self.image_tokens() + 1 + self.surface_tokens() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_config(name: &str) -> PolicyConfig {
        PolicyConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs/policy")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn shipped_configs_load() {
        let tiny = repo_config("tiny.toml");
        let small = repo_config("small.toml");
        assert_eq!(tiny.head.horizon, 16);
        // 16×16 patches of a 64×64 frame: 16 image tokens (the latency budget's choice).
        assert_eq!(small.image_tokens(), 16);
        assert_eq!(small.tokens_per_step(), 16 + 1 + 4 + 1);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/policy/tiny.toml")).unwrap();
        let e = PolicyConfig::from_toml("t.toml", &text.replace("patch = 16", "patch = 5")).unwrap_err();
        assert!(e.to_string().contains("vision.patch"), "{e}");
        let e = PolicyConfig::from_toml("t.toml", &text.replace("hidden = 128", "hiden = 128")).unwrap_err();
        assert!(
            e.to_string().contains("t.toml") && e.to_string().contains("line"),
            "{e}"
        );
    }
}
