//! One test binary: flow checking, the state machine, transcripts, and the daemon over its
//! socket (webhooks, OTP API, voice menu).

mod admin;
mod check;
mod daemon;
mod helpers;
mod machine;
mod otp;
mod transcripts;
mod voice;
