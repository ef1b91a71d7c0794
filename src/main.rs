use std::process::ExitCode;

use clap::Parser;
use smsflow::cli::{self, Cli, Command};

/// mimalloc instead of glibc malloc: a webhook allocates in many small pieces across threads
/// (hyper, the form, the state step, sled's transaction), and glibc's arenas spent about a
/// fifth of the daemon's CPU in the benchmark. Built without transparent huge pages
/// (`no_thp`): with them, resident memory rose by ~40 MiB (`smsflow export` of 100,000
/// subscribers: 70 MiB peak instead of 28).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => cli::serve(&args),
        Command::Bench(args) => cli::bench(args),
        Command::Export {
            config,
            data,
            flows,
            out,
            one_hot,
        } => cli::export(config.as_deref(), data, flows, out.as_deref(), one_hot),
        Command::Compact { config, data } => cli::compact(config.as_deref(), data),
        Command::Check { dir } => cli::check(&dir),
        Command::Test { dir } => cli::test(&dir),
        Command::Simulate { flows, phone, seed } => cli::simulate(&flows, &phone, seed),
    }
}
