//! One test binary: flow checking, the state machine, transcripts, and the daemon over its socket.

mod check;
mod daemon;
mod helpers;
mod machine;
mod transcripts;
