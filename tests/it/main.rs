//! One test binary: flow checking, the state machine, transcripts, and the daemon over its
//! socket (webhooks, OTP API, voice menu), and the store's bookkeeping.

mod admin;
mod check;
mod daemon;
mod helpers;
mod machine;
mod otp;
mod store;
mod transcripts;
mod voice;
