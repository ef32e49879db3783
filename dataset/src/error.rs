use std::path::{Path, PathBuf};

/// Every error names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: arrow: {source}", path.display())]
    Arrow {
        path: PathBuf,
        source: arrow_schema::ArrowError,
    },
    #[error("{}: parquet: {source}", path.display())]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// A frame that does not fit the dataset's features; nothing was written for it.
    #[error("frame seq {seq}: {reason}")]
    Frame { seq: u64, reason: String },
}

impl DatasetError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DatasetError + '_ {
        move |source| DatasetError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn arrow(path: &Path) -> impl FnOnce(arrow_schema::ArrowError) -> DatasetError + '_ {
        move |source| DatasetError::Arrow {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn parquet(path: &Path) -> impl FnOnce(parquet::errors::ParquetError) -> DatasetError + '_ {
        move |source| DatasetError::Parquet {
            path: path.to_path_buf(),
            source,
        }
    }
    pub(crate) fn invalid(path: &Path, reason: impl Into<String>) -> DatasetError {
        DatasetError::Invalid {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
