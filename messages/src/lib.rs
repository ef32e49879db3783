//! NanoBot messages: every type that travels between actors, the versioned envelope that
//! carries them, the topic key builders, and the wire codec. No I/O lives here.
//!
//! Wire format (schema version 1), all integers little-endian and fixed width:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 2 | magic `b"NB"` |
//! | 2 | 1 | schema version (`1`) |
//! | 3 | 1 | message kind (see [`Kind`]) |
//! | 4 | 4 | body length `B` (u32) |
//! | 8 | 8 | sequence number (u64) |
//! | 16 | 8 | timestamp, ns since the Unix epoch (u64) |
//! | 24 | 2 | robot id length `R` (u16) |
//! | 26 | R | robot id, UTF-8 |
//! | 26+R | B | body: the message fields in declaration order, bincode 2 with fixed-width little-endian integers |
//! | 26+R+B | … | blob bytes, in field order (each blob's length is the u64 that stands in its place in the body) |
//!
//! Big byte fields ([`Blob`]: camera frames, adapters) are kept out of the body so that the bus
//! can hand them to Zenoh and back without copying them.

pub mod clock;
pub mod codec;
pub mod device;
pub mod foxglove;
pub mod json;
pub mod schema;
pub mod topics;
pub mod trace;
pub mod types;
pub mod view;
mod wire;

pub use codec::{decode, decode_any, encode, peek_header, CodecError, Encoded, Header};
pub use trace::{TraceContext, TraceSampler};
pub use types::*;
pub use view::{decode_view, BlobRef, Dims, HeaderRef, MessageView, RawFrameView, Viewable};

pub use codec::{decode_any_pieces, decode_pieces, encode_any, now_ns, SCHEMA_VERSION};
pub use json::{from_json, to_json, JsonMessage};
