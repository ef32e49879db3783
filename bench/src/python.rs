//! Which Python runs the baselines (pyarrow in `bench log`): `$NANOBOT_PYTHON`, else the active
//! virtualenv's, else the project's `.venv` (made by `.ci/run`) in the working directory, else
//! `python3` on the PATH.

use std::path::PathBuf;

pub fn interpreter() -> PathBuf {
    if let Some(p) = std::env::var_os("NANOBOT_PYTHON") {
        return p.into();
    }
    let venvs = std::env::var_os("VIRTUAL_ENV")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from(".venv")]);
    for v in venvs {
        let p = v.join("bin/python3");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("python3")
}
