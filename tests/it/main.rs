//! One test binary: flow checking, the state machine, transcripts, and the daemon over its socket.

mod check;
mod machine;
mod transcripts;
