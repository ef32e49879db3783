//! Zenoh key expressions of every topic, built in one place (DESIGN.md's topic table).

use thiserror::Error;

/// The default fleet name.
pub const DEFAULT_FLEET: &str = "nb";

/// Second-level names that belong to fleet services, not robots; `unknown` is where ingest
/// counts rejects that name no usable robot.
pub const RESERVED: [&str; 5] = ["log", "replay", "ckpt", "node", UNATTRIBUTED];

/// The robot name under which rejects that name no usable robot are counted.
pub const UNATTRIBUTED: &str = "unknown";

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NameError {
    #[error("{what} name is empty")]
    Empty { what: &'static str },
    #[error(
        "{what} name {name:?} has {ch:?}, which a Zenoh key chunk cannot hold (use letters, digits, '-', '_', '.')"
    )]
    BadChar { what: &'static str, name: String, ch: char },
    #[error("robot name {0:?} is reserved for fleet services ({list})", list = RESERVED.join(", "))]
    Reserved(String),
    #[error("{what} name {name:?} starts with '.': robot names are directory names on disk, and '.', '..' and hidden names are refused")]
    LeadingDot { what: &'static str, name: String },
}

/// Check that `name` can stand as one chunk of a key expression.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(NameError::BadChar {
            what,
            name: name.to_string(),
            ch,
        });
    }
    Ok(())
}

/// Check a robot id: a valid chunk that is not a reserved service name, and safe as a
/// directory name (datasets are written to `{root}/{robot}`): no leading '.', so neither `.`
/// nor `..`.
pub fn validate_robot(name: &str) -> Result<(), NameError> {
    validate_name("robot", name)?;
    if name.starts_with('.') {
        return Err(NameError::LeadingDot {
            what: "robot",
            name: name.to_string(),
        });
    }
    if RESERVED.contains(&name) {
        return Err(NameError::Reserved(name.to_string()));
    }
    Ok(())
}

pub fn raw(fleet: &str, robot: &str, sensor: &str) -> String {
    format!("{fleet}/{robot}/raw/{sensor}")
}
pub fn obs(fleet: &str, robot: &str) -> String {
    format!("{fleet}/{robot}/obs")
}
pub fn act(fleet: &str, robot: &str) -> String {
    format!("{fleet}/{robot}/act")
}
pub fn event(fleet: &str, robot: &str) -> String {
    format!("{fleet}/{robot}/event")
}
pub fn rejects(fleet: &str, robot: &str) -> String {
    format!("{fleet}/{robot}/rejects")
}
pub fn log_ack(fleet: &str, robot: &str) -> String {
    format!("{fleet}/log/{robot}/ack")
}
/// A robot's spool → its logger: what the robot produced, kept until acknowledged.
pub fn spool(fleet: &str, robot: &str) -> String {
    format!("{fleet}/log/{robot}/spool")
}
pub fn segment(fleet: &str, robot: &str) -> String {
    format!("{fleet}/log/{robot}/segment")
}
pub fn replay_sample(fleet: &str) -> String {
    format!("{fleet}/replay/sample")
}
pub fn ckpt_candidate(fleet: &str) -> String {
    format!("{fleet}/ckpt/candidate")
}
pub fn ckpt_promoted(fleet: &str) -> String {
    format!("{fleet}/ckpt/promoted")
}
pub fn ckpt_adapter(fleet: &str) -> String {
    format!("{fleet}/ckpt/adapter")
}
/// The promoter's control queryable, one key per command (`nb/ckpt/control/list`): access
/// control can then let engineers list and only operators promote or roll back.
pub fn ckpt_control(fleet: &str, op: &str) -> String {
    format!("{fleet}/ckpt/control/{op}")
}
/// Every command's key (what the promoter declares).
pub fn ckpt_control_all(fleet: &str) -> String {
    format!("{fleet}/ckpt/control/*")
}
/// The commands that change what the fleet runs: signed by an operator, and the only ones
/// access control keeps from engineers.
pub const CKPT_CHANGES: [&str; 2] = ["promote", "rollback"];
pub fn policy_status(fleet: &str, robot: &str) -> String {
    format!("{fleet}/{robot}/policy")
}
/// Liveliness token and stats of one actor.
pub fn node_actor(fleet: &str, node: &str, actor: &str) -> String {
    format!("{fleet}/node/{node}/{actor}")
}
/// Every actor of the fleet (liveliness queries).
pub fn all_actors(fleet: &str) -> String {
    format!("{fleet}/node/**")
}

/// The robot a robot-scoped key belongs to (`nb/r0/act` → `r0`).
pub fn robot_of<'a>(fleet: &str, key: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(fleet)?.strip_prefix('/')?;
    let robot = rest.split('/').next()?;
    (!RESERVED.contains(&robot) && !robot.is_empty()).then_some(robot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robot_names_are_safe_directory_names() {
        for bad in [".", "..", ".hidden", "unknown", "log", "a/b", "", "esp\0zz"] {
            assert!(validate_robot(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["r0", "arm-left", "esp32_07", "a.b"] {
            assert!(validate_robot(good).is_ok(), "{good:?} must be accepted");
        }
        assert!(validate_robot("..")
            .unwrap_err()
            .to_string()
            .contains("starts with '.'"));
    }

    #[test]
    fn keys_and_robot_of() {
        assert_eq!(raw("nb", "r0", "cam"), "nb/r0/raw/cam");
        assert_eq!(robot_of("nb", &act("nb", "r3")), Some("r3"));
        assert_eq!(robot_of("nb", &segment("nb", "r3")), None);
        assert_eq!(robot_of("nb", "other/r3/act"), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_robot("arm-01.left").is_ok());
        assert!(matches!(validate_robot("a/b"), Err(NameError::BadChar { ch: '/', .. })));
        assert!(matches!(validate_robot("a*"), Err(NameError::BadChar { ch: '*', .. })));
        assert_eq!(validate_robot("log"), Err(NameError::Reserved("log".into())));
        assert!(matches!(validate_name("node", ""), Err(NameError::Empty { .. })));
    }
}
