//! A load generator for `mlops serve`: N clients send TF Serving predict requests of real
//! MNIST test images over keep-alive connections for a fixed time, then print requests/s,
//! images/s, latency percentiles and the share of correct answers.
//!
//! ```text
//! mlops serve runs/default/model.int8.safetensors &
//! cargo run --release --example load -- http://127.0.0.1:8501 model.int8 16 5 1
//! #                                     URL                   MODEL   CLIENTS SECONDS IMAGES/REQUEST
//! ```
//!
//! Why by hand: the usual HTTP load tools (wrk, hey, oha) are not on every machine and do
//! not check the answers; this one needs nothing but the repository.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, model, clients, seconds, per_request] = args.as_slice() else {
        anyhow::bail!("usage: load URL MODEL CLIENTS SECONDS IMAGES_PER_REQUEST");
    };
    let (clients, seconds, per_request): (usize, f64, usize) =
        (clients.parse()?, seconds.parse()?, per_request.parse()?);
    anyhow::ensure!(
        clients > 0 && seconds > 0.0,
        "CLIENTS and SECONDS must be positive"
    );
    let split = mlops::data::load_split(
        std::path::Path::new("fixtures/mnist"),
        mlops::data::SplitKind::Test,
    )?;
    anyhow::ensure!(
        (1..=split.count).contains(&per_request),
        "IMAGES_PER_REQUEST must be 1..={}",
        split.count
    );
    // Pre-built bodies, so the clients spend their time on HTTP, not on JSON.
    let requests: Arc<Vec<(String, Vec<u8>)>> = Arc::new(
        (0..split.count / per_request)
            .map(|r| {
                let indices: Vec<usize> = (r * per_request..(r + 1) * per_request).collect();
                let (mut x, mut labels) = (Vec::new(), Vec::new());
                split.gather(
                    &indices,
                    &mlops::data::Preprocess::UNIT,
                    &mut x,
                    &mut labels,
                );
                let instances: Vec<&[f32]> = x.chunks_exact(784).collect();
                let body = serde_json::json!({ "instances": instances }).to_string();
                (body, labels)
            })
            .collect(),
    );
    let endpoint = format!("{url}/v1/models/{model}:predict");
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            let (requests, endpoint, stop) = (requests.clone(), endpoint.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                let (mut latencies, mut correct, mut images) = (Vec::new(), 0usize, 0usize);
                let mut r = c;
                while !stop.load(Ordering::Relaxed) {
                    let (body, labels) = &requests[r % requests.len()];
                    let started = Instant::now();
                    let text = agent
                        .post(&endpoint)
                        .set("Content-Type", "application/json")
                        .send_string(body)
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                        .into_string()?;
                    let answer: serde_json::Value = serde_json::from_str(&text)?;
                    latencies.push(started.elapsed());
                    for (p, &label) in answer["predictions"].as_array().unwrap().iter().zip(labels)
                    {
                        correct += (p["class"] == label as u64) as usize;
                    }
                    images += labels.len();
                    r += clients;
                }
                anyhow::Ok((latencies, correct, images))
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, mut correct, mut images) = (Vec::new(), 0, 0);
    for worker in workers {
        let (l, c, i) = worker.join().expect("client thread")?;
        latencies.extend(l);
        correct += c;
        images += i;
    }
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(!latencies.is_empty(), "no request finished in {seconds} s");
    latencies.sort();
    let pct = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "{clients} clients, {per_request} image(s)/request, {elapsed:.1} s: {:.0} requests/s, {:.0} images/s, latency p50 {:.0} us, p99 {:.0} us, correct {:.2}%",
        latencies.len() as f64 / elapsed,
        images as f64 / elapsed,
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        100.0 * correct as f64 / images.max(1) as f64
    );
    Ok(())
}
