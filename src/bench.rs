//! `smsflow bench`: durable inbound webhooks against a trivial route of the same server, in one
//! run, so the ratio means something on a noisy machine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::app::{Application, Options};
use crate::config::Layer;
use crate::engine::WorkSnapshot;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Concurrent connections (1 to 4,096, the daemon's own limit).
    #[arg(long, default_value_t = 64,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub connections: usize,
    /// Requests per route (at most 10,000,000: each webhook comes from its own number).
    #[arg(long, default_value_t = 20_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=10_000_000))]
    pub requests: usize,
    /// The flow directory the daemon loads.
    #[arg(long, default_value = "flows")]
    pub flows: std::path::PathBuf,
    /// The text each (distinct) number sends.
    #[arg(long, default_value = "HELP")]
    pub body: String,
    /// Rounds of (trivial, durable); the median ratio is reported.
    /// (Each round's webhooks come from their own area code: a hundred rounds at most.)
    #[arg(long, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    pub rounds: usize,
    /// Instead: fill a store with this many subscribers and measure `smsflow export`'s peak
    /// memory at a tenth of it and at all of it.
    #[arg(long)]
    pub export_subscribers: Option<u64>,
    /// Instead: this many numbers text JOIN at once (at most the flows' `max_codes_per_hour`),
    /// and the outbox sends their codes through a fake Twilio on loopback that answers after
    /// `--twilio-ms`; measures how fast they all reach it.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub outbox: Option<usize>,
    /// How long the fake Twilio of `--outbox` takes to answer, in milliseconds.
    #[arg(long, default_value_t = 150,
          value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(0..=10_000))]
    pub twilio_ms: u64,
}

/// Latency figures of one run.
#[derive(Debug, Clone)]
pub struct Figures {
    pub requests: usize,
    pub errors: usize,
    pub p50: Duration,
    pub p99: Duration,
    /// How long the run took.
    pub elapsed: Duration,
    /// The whole process's CPU time (server and client) per request, when the OS tells it.
    pub cpu_per_request: Option<Duration>,
    /// The host's CPU time meanwhile, when the OS tells it.
    pub host: Option<HostTime>,
}

impl Figures {
    /// Answered requests per second.
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// The host's CPU time over a run, in clock ticks (all cores): how much there was, how much
/// was idle (no thread of anyone's wanted a core) and how much was stolen (a virtual
/// machine's cores given to other guests). Much of either means the run measured the host
/// as much as smsflow.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostTime {
    pub total: u64,
    pub idle: u64,
    pub steal: u64,
}

impl HostTime {
    fn share(&self, part: u64) -> f64 {
        100.0 * part as f64 / self.total.max(1) as f64
    }

    /// The idle and stolen shares, in percent ("?" for a run within one clock tick).
    fn shares(host: Option<HostTime>) -> String {
        match host.filter(|h| h.total > 0) {
            Some(h) => format!(
                "host idle {:.0}% steal {:.0}%",
                h.share(h.idle),
                h.share(h.steal)
            ),
            None => "host idle ? steal ?".to_string(),
        }
    }
}

/// The host's CPU time so far (Linux: the `cpu` line of /proc/stat).
fn host_ticks() -> Option<HostTime> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(stat.lines().find(|l| l.starts_with("cpu "))?)
}

/// `cpu  user nice system idle iowait irq softirq steal guest guest_nice`: the total is the
/// first eight (guest time is already inside user and nice), idle counts iowait too.
fn parse_cpu_line(line: &str) -> Option<HostTime> {
    let n: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some(HostTime {
        total: n.get(..8)?.iter().sum(),
        idle: n.get(3)? + n.get(4)?,
        steal: *n.get(7)?,
    })
}

fn host_between(a: Option<HostTime>, b: Option<HostTime>) -> Option<HostTime> {
    let (a, b) = (a?, b?);
    Some(HostTime {
        total: b.total.checked_sub(a.total)?,
        idle: b.idle.saturating_sub(a.idle),
        steal: b.steal.saturating_sub(a.steal),
    })
}

/// CPU time this process has used so far (Linux: /proc/self/stat, in clock ticks of 10 ms).
fn cpu_used() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// The daemon serving in this process, for a benchmark: its address and engine, and how to
/// stop it.
struct Serving {
    base: String,
    engine: Arc<crate::engine::Engine>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Serving {
    /// Builds the daemon of `config` (its console quiet) and serves it.
    async fn start(config: crate::config::Config) -> anyhow::Result<Serving> {
        let app = Application::build(
            config,
            Options {
                quiet_console: true,
                ..Options::default()
            },
        )
        .await?;
        let base = format!("http://127.0.0.1:{}", app.port());
        let engine = app.engine();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Ok(Serving {
            base,
            engine,
            stop,
            server,
        })
    }

    /// Stops it, and waits until it is gone.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        drop(self.engine);
        self.server.await?
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<String> {
    if let Some(n) = args.export_subscribers {
        return tokio::task::spawn_blocking(move || export(n, &args.flows)).await?;
    }
    if let Some(n) = args.outbox {
        return outbox(n, Duration::from_millis(args.twilio_ms), &args.flows).await;
    }
    let data = std::env::temp_dir().join(format!("smsflow-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let config = Layer {
        listen: Some("127.0.0.1:0".into()),
        data: Some(data.clone()),
        flows: Some(args.flows.clone()),
        ..Layer::default()
    }
    .resolve()?;
    let serving = Serving::start(config).await?;
    let (base, engine) = (serving.base.clone(), serving.engine.clone());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;

    // Warm up both routes (connections, caches).
    drive(
        &client,
        &base,
        args.connections,
        2_000.min(args.requests),
        Route::Trivial,
        &args.body,
        9,
    )
    .await;
    drive(
        &client,
        &base,
        args.connections,
        2_000.min(args.requests),
        Route::Webhook,
        &args.body,
        0,
    )
    .await;
    // Alternate the routes over several rounds: the machine's speed drifts, and a ratio
    // taken from neighbouring runs is what survives that noise.
    let mut rounds = Vec::new();
    for round in 0..args.rounds.max(1) {
        let trivial = drive(
            &client,
            &base,
            args.connections,
            args.requests,
            Route::Trivial,
            &args.body,
            0,
        )
        .await;
        let run = 1 + round as u64;
        let before = engine.writer_work();
        let webhook = drive(
            &client,
            &base,
            args.connections,
            args.requests,
            Route::Webhook,
            &args.body,
            run,
        )
        .await;
        let work = engine.writer_work().since(&before);
        rounds.push((trivial, webhook, work));
    }

    drop(engine);
    serving.stop().await?;
    let _ = std::fs::remove_dir_all(&data);

    let line = |name: &str, f: &Figures| {
        format!(
            "  {name:<28} {:>9.0} req/s   p50 {:>7.2} ms   p99 {:>7.2} ms   cpu {:>4} us/req   {}   ({} requests, {} errors)\n",
            f.per_second(),
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            f.cpu_per_request
                .map_or("?".to_string(), |c| c.as_micros().to_string()),
            HostTime::shares(f.host),
            f.requests,
            f.errors
        )
    };
    let mut out = format!(
        "smsflow bench: {} connections, loopback, same process, {} round(s)\n",
        args.connections,
        rounds.len()
    );
    let mut ratios = Vec::new();
    let mut worst_p99 = Duration::ZERO;
    for (n, (trivial, webhook, work)) in rounds.iter().enumerate() {
        let ratio = webhook.per_second() / trivial.per_second();
        out += &format!("round {}: ratio {ratio:.2}\n", n + 1);
        out += &line("GET /healthz (trivial)", trivial);
        out += &line("POST /twilio/sms (durable)", webhook);
        out += &writer_line(work, webhook);
        ratios.push(ratio);
        worst_p99 = worst_p99.max(webhook.p99);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    out += &format!(
        "median ratio durable/trivial: {median:.2} (target >= 0.50: {}); worst webhook p99 {:.2} ms (target <= 20 ms: {})\n",
        verdict(median >= 0.50),
        worst_p99.as_secs_f64() * 1e3,
        verdict(worst_p99 <= Duration::from_millis(20)),
    );
    // Over all the runs together: one tick of a short run is no share worth a note.
    let host = rounds
        .iter()
        .flat_map(|(t, w, _)| [t.host, w.host])
        .flatten()
        .fold(HostTime::default(), |sum, h| HostTime {
            total: sum.total + h.total,
            idle: sum.idle + h.idle,
            steal: sum.steal + h.steal,
        });
    if host.total >= 100 && host.share(host.steal) >= 5.0 {
        out += &format!(
            "NOTE: the hypervisor took {:.0}% of this machine's CPU time during the runs; \
             the figures measure that as much as smsflow (run again when the host is quiet)\n",
            host.share(host.steal)
        );
    }
    let failed: usize = rounds.iter().map(|(t, w, _)| t.errors + w.errors).sum();
    if failed > 0 {
        out += &format!(
            "WARNING: {failed} request(s) failed; they are left out of the figures, which do not stand\n"
        );
    }
    Ok(out)
}

/// Where the durable route's time went in the writer, the one thread every change passes
/// through: events per commit, each commit's time stepping and committing and then waiting
/// for the disk, the share of the run it was busy, and the rate it could carry at that
/// batch size. A writer busy nearly all the run is what bounds the durable route.
fn writer_line(work: &WorkSnapshot, run: &Figures) -> String {
    if work.commits == 0 {
        return "    writer: no commits\n".to_string();
    }
    let per_commit = |d: Duration| d.as_secs_f64() * 1e6 / work.commits as f64;
    let busy = work.commit + work.flush;
    format!(
        "    writer: {:.1} events per commit; per commit {:.0} us stepping and committing + {:.0} us flushing; busy {:.0}% of the run; at most {:.0} events/s at this batch size\n",
        work.events as f64 / work.commits as f64,
        per_commit(work.commit),
        per_commit(work.flush),
        100.0 * busy.as_secs_f64() / run.elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        work.events as f64 / busy.as_secs_f64().max(f64::MIN_POSITIVE),
    )
}

#[derive(Clone, Copy)]
enum Route {
    Trivial,
    Webhook,
}

async fn drive(
    client: &reqwest::Client,
    base: &str,
    connections: usize,
    requests: usize,
    route: Route,
    body: &str,
    run: u64,
) -> Figures {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    // Webhook bodies are built before the clock starts: the load generator shares the cores
    // with the daemon, and its own form encoding is not what is being measured.
    let bodies: Arc<Vec<axum::body::Bytes>> = Arc::new(match route {
        Route::Trivial => Vec::new(),
        Route::Webhook => (0..requests)
            .map(|i| {
                // A distinct number and message id per request.
                // Its own area code per run (the warm-up is run 0), a distinct line per request.
                let from = format!("+1{}{:07}", 200 + run, i % 10_000_000);
                let sid = format!("SMbench{run}x{i}");
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("From", &from)
                    .append_pair("To", "+15005550006")
                    .append_pair("Body", body)
                    .append_pair("MessageSid", &sid)
                    .finish()
                    .into()
            })
            .collect(),
    });
    let (started, cpu_at_start, host_at_start) = (Instant::now(), cpu_used(), host_ticks());
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, base, bodies) = (client.clone(), base.to_string(), bodies.clone());
        let (next, errors) = (next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return latencies;
                }
                let t = Instant::now();
                let result = match route {
                    Route::Trivial => client.get(format!("{base}/healthz")).send().await,
                    Route::Webhook => {
                        client
                            .post(format!("{base}/twilio/sms"))
                            .header(
                                reqwest::header::CONTENT_TYPE,
                                "application/x-www-form-urlencoded",
                            )
                            .body(bodies[i].clone())
                            .send()
                            .await
                    }
                };
                // Only answered successes count: a failure is no throughput.
                match result {
                    Ok(r) if r.status().is_success() => {
                        if r.bytes().await.is_ok() {
                            latencies.push(t.elapsed());
                            continue;
                        }
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut all = Vec::with_capacity(requests);
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = started.elapsed();
    let cpu = cpu_at_start
        .zip(cpu_used())
        .map(|(a, b)| b.saturating_sub(a));
    all.sort();
    // Nearest rank: the smallest latency at least a fraction `p` of the requests did not exceed.
    let pct = |p: f64| {
        let rank = (all.len() as f64 * p).ceil() as usize;
        all.get(rank.saturating_sub(1)).copied().unwrap_or_default()
    };
    Figures {
        requests: all.len(),
        errors: errors.load(Ordering::Relaxed),
        p50: pct(0.50),
        p99: pct(0.99),
        elapsed,
        cpu_per_request: cpu.map(|c| c / all.len().max(1) as u32),
        host: host_between(host_at_start, host_ticks()),
    }
}

/// Fills a store, then runs `smsflow export` as a child process at n/10 and at n subscribers.
fn export(n: u64, flows_dir: &std::path::Path) -> anyhow::Result<String> {
    use crate::machine::{State, Subscriber};
    use crate::phone::Phone;
    use crate::store::{Commit, Store};
    let dir = std::env::temp_dir().join(format!("smsflow-export-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let exe = std::env::current_exe()?;
    let mut out = format!(
        "smsflow bench: export of {n} subscribers (child process, --one-hot, to /dev/null)\n"
    );
    let mut filled = 0u64;
    let mut peaks = Vec::new();
    for target in [n / 10, n] {
        let started = Instant::now();
        {
            let store = Store::open_with_cache(&dir, 64 << 20)?;
            let now = chrono::Utc::now();
            while filled < target {
                let batch: Vec<Commit> = (filled..target.min(filled + 1000))
                    .map(|i| {
                        let phone = Phone::from_stored(format!("+1{:010}", 2_000_000_000 + i))?;
                        let mut s = Subscriber::new(phone, now);
                        s.state = if i % 7 == 0 {
                            State::OptedOut
                        } else {
                            State::Verified
                        };
                        s.verified_at = Some(now);
                        s.fields.insert("first_name".into(), format!("Name{i}"));
                        let pick = (i % 3) as usize;
                        s.fields.insert(
                            "age_group".into(),
                            ["under_30", "30_50", "over_50"][pick].into(),
                        );
                        s.fields.insert(
                            "channel".into(),
                            ["friend", "social_media", "other"][pick].into(),
                        );
                        Ok(Commit {
                            subscriber: Some(s),
                            ..Commit::default()
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                filled += batch.len() as u64;
                store.commit_many(&batch, now)?;
            }
            store.flush()?;
        }
        let fill = started.elapsed();
        let started = Instant::now();
        let child = std::process::Command::new(&exe)
            .arg("export")
            .arg("--data")
            .arg(&dir)
            .arg("--flows")
            .arg(flows_dir)
            .args(["--out", "/dev/null", "--one-hot"])
            .output()?;
        anyhow::ensure!(
            child.status.success(),
            "export failed: {}",
            String::from_utf8_lossy(&child.stderr)
        );
        let report = String::from_utf8_lossy(&child.stderr).trim().to_string();
        let mib = |label: &str| -> f64 {
            report
                .split(label)
                .nth(1)
                .and_then(|s| s.split(" MiB").next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let (peak, opened) = (mib("peak memory "), mib("after opening the store: "));
        peaks.push((peak, peak - opened));
        let secs = started.elapsed().as_secs_f64();
        out += &format!(
            "{target:>9} subscribers: filled in {:.1} s, exported in {secs:.1} s ({:.0} rows/s): {report}\n",
            fill.as_secs_f64(),
            target as f64 / secs
        );
    }
    out += &format!(
        "peak memory ratio (all / tenth): {:.2}\n\
         the export's own share (peak minus after opening the store): {:.1} MiB then {:.1} MiB, ratio {:.2}\n",
        peaks[1].0 / peaks[0].0,
        peaks[0].1,
        peaks[1].1,
        peaks[1].1 / peaks[0].1
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// `bench --outbox N`: N numbers text JOIN (signed webhooks, as from Twilio), and the outbox
/// sends the N codes through a fake Twilio on loopback that answers each after `latency`; the
/// figure is how fast they reach it, beside what one send at a time could do at that latency.
async fn outbox(n: usize, latency: Duration, flows: &std::path::Path) -> anyhow::Result<String> {
    const TOKEN: &str = "bench-auth-token";
    // Over the cap, the rest would be told to wait (a 200 all the same), and their codes
    // waited for in vain.
    if let Ok(loaded) = crate::flows::load_dir(flows) {
        if let Some(cap) = loaded
            .verify
            .max_codes_per_hour
            .filter(|cap| n > *cap as usize)
        {
            anyhow::bail!(
                "--outbox {n} is over the flows' verify.max_codes_per_hour ({cap}): the codes \
                 past it would not be sent; give at most {cap}, or flows with a higher cap"
            );
        }
    }
    let received = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(tokio::sync::Notify::new());
    let fake = axum::Router::new().route(
        "/2010-04-01/Accounts/{sid}/Messages.json",
        axum::routing::post({
            let (received, all_in) = (received.clone(), all_in.clone());
            move || async move {
                tokio::time::sleep(latency).await;
                let k = received.fetch_add(1, Ordering::SeqCst) + 1;
                if k >= n {
                    all_in.notify_one();
                }
                (
                    axum::http::StatusCode::CREATED,
                    axum::Json(
                        serde_json::json!({ "sid": format!("SM{k:032}"), "status": "queued" }),
                    ),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let fake_base = format!("http://{}", listener.local_addr()?);
    let fake_server = tokio::spawn(async move { axum::serve(listener, fake).await });

    let data = std::env::temp_dir().join(format!("smsflow-bench-outbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let config = Layer {
        listen: Some("127.0.0.1:0".into()),
        data: Some(data.clone()),
        flows: Some(flows.to_path_buf()),
        // No sender's rate in the way: what is measured is the sends themselves.
        send_rate: Some(1_000_000.0),
        twilio: crate::config::TwilioLayer {
            account_sid: Some("AC00000000000000000000000000000001".into()),
            auth_token: Some(crate::config::Secret::new(TOKEN)),
            from: Some("+15005550006".into()),
            api_base: Some(fake_base),
            ..crate::config::TwilioLayer::default()
        },
        ..Layer::default()
    }
    .resolve()?;
    let serving = Serving::start(config).await?;
    let client = reqwest::Client::new();
    let url = format!("{}/twilio/sms", serving.base);
    let started = Instant::now();
    let mut refused = 0;
    for i in 0..n {
        let params: Vec<(String, String)> = [
            ("From", format!("+1415{:07}", i)),
            ("To", "+15005550006".to_string()),
            ("Body", "JOIN".to_string()),
            ("MessageSid", format!("SMbenchoutbox{i}")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let signature = crate::http::signature::sign(TOKEN, &url, &params);
        let answer = client
            .post(&url)
            .header("X-Twilio-Signature", signature)
            .form(&params)
            .send()
            .await?;
        refused += usize::from(!answer.status().is_success());
    }
    let queued = started.elapsed();
    let waited = tokio::time::timeout(Duration::from_secs(600), all_in.notified()).await;
    let elapsed = started.elapsed();
    serving.stop().await?;
    fake_server.abort();
    let _ = std::fs::remove_dir_all(&data);
    let got = received.load(Ordering::SeqCst);
    if refused > 0 || waited.is_err() {
        anyhow::bail!(
            "{refused} webhook(s) refused, {got} of {n} codes reached the fake Twilio in {:.1} s \
             (is --outbox over the flows' max_codes_per_hour?)",
            elapsed.as_secs_f64()
        );
    }
    let rate = got as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
    let serial = 1.0 / latency.as_secs_f64().max(1e-3);
    Ok(format!(
        "smsflow bench --outbox: {n} numbers texted JOIN (queued in {:.2} s); their {got} codes \
         reached a fake Twilio answering in {} ms after {:.2} s: {rate:.1} messages/s; one send \
         at a time could do at most {serial:.1}/s at that latency (ratio {:.1})\n",
        queued.as_secs_f64(),
        latency.as_millis(),
        elapsed.as_secs_f64(),
        rate / serial
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{host_between, parse_cpu_line, writer_line, Figures, HostTime};
    use crate::engine::WorkSnapshot;

    #[test]
    fn the_writer_line_gives_per_commit_times_its_busy_share_and_the_rate_it_could_carry() {
        let earlier = WorkSnapshot {
            commits: 5,
            events: 7,
            commit: Duration::from_millis(1),
            flush: Duration::from_millis(1),
        };
        let now = WorkSnapshot {
            commits: 15,
            events: 167,
            commit: Duration::from_millis(3),
            flush: Duration::from_millis(4),
        };
        let work = now.since(&earlier);
        assert_eq!(
            (work.commits, work.events),
            (10, 160),
            "only what happened in between"
        );
        // 160 requests in 10 ms; the writer was busy 2 + 3 = 5 ms of it.
        let run = Figures {
            requests: 160,
            errors: 0,
            p50: Duration::ZERO,
            p99: Duration::ZERO,
            elapsed: Duration::from_millis(10),
            cpu_per_request: None,
            host: None,
        };
        assert_eq!(
            writer_line(&work, &run),
            "    writer: 16.0 events per commit; per commit 200 us stepping and committing + 300 us flushing; busy 50% of the run; at most 32000 events/s at this batch size\n"
        );
        assert_eq!(
            writer_line(&WorkSnapshot::default(), &run),
            "    writer: no commits\n"
        );
    }

    #[test]
    fn host_time_is_read_from_the_cpu_line_without_counting_guest_time_twice() {
        let before = parse_cpu_line("cpu  100 5 50 800 20 3 2 10 40 1").unwrap();
        assert_eq!(
            before,
            HostTime {
                total: 990,
                idle: 820,
                steal: 10
            }
        );
        let after = parse_cpu_line("cpu  160 5 50 880 20 3 2 70 99 1").unwrap();
        let run = host_between(Some(before), Some(after)).unwrap();
        assert_eq!((run.total, run.idle, run.steal), (200, 80, 60));
        assert_eq!(HostTime::shares(Some(run)), "host idle 40% steal 30%");
        assert_eq!(HostTime::shares(None), "host idle ? steal ?");
        // An older kernel's shorter line, or a counter that went back, is no figure.
        assert_eq!(parse_cpu_line("cpu  1 2 3 4"), None);
        assert_eq!(host_between(Some(after), Some(before)), None);
    }
}
