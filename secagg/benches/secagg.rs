//! SecAgg+ round benchmark: per-client and server compute time and peak memory for the
//! configurations that `bench/run.sh` compares with Flower (transport left out).
//!
//! `cargo bench -p nanofleet-secagg --bench secagg` runs every configuration;
//! `... -- N D K DROP_PERCENT` runs one and prints one `RESULT` line for scripts.

use std::time::{Duration, Instant};

use nanofleet_secagg::{Client, ClientMessage, Config, Params, Server};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

struct Outcome {
    client_median: Duration,
    server: Duration,
    /// The part of `server` spent checking and adding masked inputs as they arrive.
    server_summing: Duration,
    peak_rss_mib: f64,
}

fn timed<T>(total: &mut Duration, work: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = work();
    *total += start.elapsed();
    out
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Resets the kernel's peak-RSS mark so each configuration is measured on its own.
fn reset_peak_rss() {
    // Best effort: without the file the peak covers the whole process, which the table
    // would then over-state.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn run(n: u32, d: usize, k: u32, drop_percent: u32) -> Outcome {
    reset_peak_rss();
    let mut config = Config::new(n, d);
    config.group_size = k;
    config.threshold = 2 * k / 3 + 1;
    config.graph_seed = [42; 32];
    let params = Params::new(config).expect("benchmark parameters are valid");
    let mut rng = ChaCha20Rng::seed_from_u64(u64::from(n) * 1_000_003 + d as u64);
    let dropped = (n * drop_percent / 100) as usize;

    let mut server = Server::new(params.clone());
    let mut server_time = Duration::ZERO;
    let mut client_times = vec![Duration::ZERO; n as usize];
    let mut clients: Vec<Client> = (0..n)
        .map(|id| {
            timed(&mut client_times[id as usize], || {
                Client::new(id, params.clone(), &mut rng)
            })
            .unwrap()
        })
        .collect();

    for client in &mut clients {
        let keys = timed(&mut client_times[client.id() as usize], || {
            client.advertise()
        })
        .unwrap();
        timed(&mut server_time, || {
            server.receive(ClientMessage::AdvertiseKeys(keys))
        })
        .unwrap();
    }
    timed(&mut server_time, || server.close_stage()).unwrap();
    for client in &mut clients {
        let keys = timed(&mut server_time, || server.advertised_keys_for(client.id())).unwrap();
        let shares = timed(&mut client_times[client.id() as usize], || {
            client.share_keys(&keys)
        })
        .unwrap();
        timed(&mut server_time, || {
            server.receive(ClientMessage::ShareKeys(shares))
        })
        .unwrap();
    }
    timed(&mut server_time, || server.close_stage()).unwrap();
    // The last `dropped` clients vanish during the masked-input stage, after sharing keys:
    // the server must rebuild their mask keys and regenerate their pairwise masks.
    let survivors = n as usize - dropped;
    let mut server_summing = Duration::ZERO;
    for client in clients.iter_mut().take(survivors) {
        let input: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let shares = timed(&mut server_time, || server.shares_for(client.id())).unwrap();
        let masked = timed(&mut client_times[client.id() as usize], || {
            client.masked_input(&shares, &input)
        })
        .unwrap();
        timed(&mut server_summing, || {
            server.receive(ClientMessage::MaskedInput(masked))
        })
        .unwrap();
    }
    timed(&mut server_time, || server.close_stage()).unwrap();
    for client in clients.iter_mut().take(survivors) {
        let request = timed(&mut server_time, || server.unmask_request_for(client.id())).unwrap();
        let response = timed(&mut client_times[client.id() as usize], || {
            client.unmask(&request)
        })
        .unwrap();
        timed(&mut server_time, || {
            server.receive(ClientMessage::Unmask(response))
        })
        .unwrap();
    }
    let aggregate = timed(&mut server_time, || server.close_stage())
        .unwrap()
        .expect("the unmask stage yields the aggregate");
    assert_eq!(aggregate.contributors().len(), survivors);
    let decoded = timed(&mut server_time, || aggregate.decode());
    assert!(decoded.iter().all(|v| v.abs() <= survivors as f32 + 1e-3));

    let mut surviving_times: Vec<Duration> = client_times[..survivors].to_vec();
    surviving_times.sort();
    Outcome {
        client_median: surviving_times[survivors / 2],
        server: server_time + server_summing,
        server_summing,
        peak_rss_mib: peak_rss_mib(),
    }
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let configs: Vec<(u32, usize, u32, u32)> = if let [n, d, k, drop] = args[..] {
        vec![(n as u32, d as usize, k as u32, drop as u32)]
    } else {
        let mut all = Vec::new();
        for (n, k) in [(10, 10), (100, 21)] {
            for d in [100_000, 1_000_000] {
                for drop in [0, 10] {
                    all.push((n, d, k, drop));
                }
            }
        }
        all
    };
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    println!("nanofleet-secagg SecAgg+ round, server threads: {threads}, client threads: 1");
    println!(
        "{:>5} {:>9} {:>4} {:>5} {:>14} {:>10} {:>14} {:>10}",
        "N", "d", "k", "drop", "client med s", "server s", "of which sum s", "peak MiB"
    );
    for (n, d, k, drop) in configs {
        let outcome = run(n, d, k, drop);
        println!(
            "{n:>5} {d:>9} {k:>4} {:>4}% {:>14.4} {:>10.4} {:>14.4} {:>10.1}",
            drop,
            outcome.client_median.as_secs_f64(),
            outcome.server.as_secs_f64(),
            outcome.server_summing.as_secs_f64(),
            outcome.peak_rss_mib
        );
        println!(
            "RESULT nanofleet {n} {d} {k} {drop} {:.6} {:.6} {:.1}",
            outcome.client_median.as_secs_f64(),
            outcome.server.as_secs_f64(),
            outcome.peak_rss_mib
        );
    }
}
