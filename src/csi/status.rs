//! snapvol errors as gRPC statuses: the code from [`Error::kind`], the message from the
//! error's text (which names the object and what was wrong).

use tonic::{Code, Status};

use crate::error::{Error, ErrorKind};

/// The gRPC code for an error kind.
pub(crate) fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The status for a snapvol error.
pub(crate) fn status(e: Error) -> Status {
    Status::new(code(e.kind()), e.to_string())
}

/// Converts a snapvol result for a handler.
pub(crate) trait OrStatus<T> {
    /// The value, or the error as a status.
    fn or_status(self) -> Result<T, Status>;
}

impl<T> OrStatus<T> for crate::Result<T> {
    fn or_status(self) -> Result<T, Status> {
        self.map_err(status)
    }
}

/// `INVALID_ARGUMENT` for a required field left empty.
pub(crate) fn required(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

/// Refuses a name longer than CSI allows (128 bytes) or empty.
pub(crate) fn check_name(field: &str, name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(required(field));
    }
    if name.len() > 128 {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; CSI allows at most 128",
            name.len()
        )));
    }
    Ok(())
}

/// A non-negative `int32` count (max_entries, max_results), 0 meaning "no limit given".
pub(crate) fn count(field: &str, n: i32) -> Result<usize, Status> {
    usize::try_from(n).map_err(|_| Status::invalid_argument(format!("{field} is negative ({n})")))
}

/// A non-negative `int64` byte count or offset.
pub(crate) fn bytes(field: &str, n: i64) -> Result<u64, Status> {
    u64::try_from(n).map_err(|_| Status::invalid_argument(format!("{field} is negative ({n})")))
}

/// A byte count as CSI's `int64`: every snapvol size fits (volumes are at most 1 EiB).
pub(crate) fn int64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Lookup;
    use crate::ids::SnapshotId;

    #[test]
    fn each_error_kind_has_the_grpc_code_csi_expects() {
        let cases = [
            (
                Error::SnapshotNotFound(Lookup::Id(SnapshotId::from_u128(7))),
                Code::NotFound,
            ),
            (
                Error::AlreadyExists {
                    kind: "volume",
                    name: "a".into(),
                    conflict: "size".into(),
                },
                Code::AlreadyExists,
            ),
            (Error::BadToken("x".into()), Code::InvalidArgument),
            (Error::Internal("bug".into()), Code::Internal),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            let s = status(e);
            assert_eq!(s.code(), want, "{text}");
            assert_eq!(s.message(), text);
        }
    }

    #[test]
    fn counts_and_sizes_refuse_negative_values() {
        assert_eq!(count("max_entries", 0).unwrap(), 0);
        assert_eq!(
            count("max_entries", -1).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(
            bytes("offset", i64::MIN).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert_eq!(int64(u64::MAX), i64::MAX);
        assert_eq!(
            check_name("name", &"a".repeat(129)).unwrap_err().code(),
            Code::InvalidArgument
        );
        assert!(check_name("name", &"a".repeat(128)).is_ok());
    }
}
