//! Durable state: record encoding now; the sled store lives here too.

pub mod codec;
