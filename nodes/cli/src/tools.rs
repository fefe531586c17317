//! Offline tools: `twinmesh sim` (simulated samples as CSV), `twinmesh dsp` (any signal
//! operator over CSV) and `twinmesh ingest` (upload a CSV/JSON file into a twin's
//! history through gRPC).
//!
//! CSV input has a header; the samples are the column named `value` (or `--column`, or
//! the only column). A malformed row is an error naming its line; nothing is written
//! before the whole input has been read.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use twinmesh_proto::v1::twin_service_client::TwinServiceClient;
use twinmesh_sim::{generate, Fault, SimDevice};
use twinmesh_twins::dsp::{self, BandType, Spectral};
use twinmesh_twins::proto::ImportHistoryRequest;
use twinmesh_twins::{AssetKind, TwinId};

/// Most samples `twinmesh sim` writes in one run.
pub const MAX_SIM_SAMPLES: f64 = 50_000_000.0;

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Asset kind (wind_turbine, spindle, crankshaft_line, closure_line, turnstile_gate,
    /// wifi_ap, power_meter, hpc_node).
    pub kind: AssetKind,
    /// Length of the simulation.
    #[arg(long)]
    pub seconds: f64,
    /// Sample rate (default: the signal's own rate).
    #[arg(long)]
    pub fs: Option<f64>,
    /// Signal to write (default: the kind's primary signal).
    #[arg(long, conflicts_with = "all")]
    pub signal: Option<String>,
    /// Write every signal of the kind, one column each.
    #[arg(long)]
    pub all: bool,
    /// Fault mode (e.g. outer_race, harmonic_distortion, drift:power).
    #[arg(long)]
    pub fault: Option<String>,
    /// When the fault starts, seconds from the start.
    #[arg(long, default_value_t = 0.0, requires = "fault")]
    pub fault_at: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Hour of the day (UTC) the simulation starts at (daily patterns).
    #[arg(long, default_value_t = 12.0)]
    pub start_hour: f64,
}

pub fn sim(args: SimArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let schema = args.kind.schema();
    let signals: Vec<&'static str> = if args.all {
        schema.signals.iter().map(|s| s.name).collect()
    } else {
        let name = args
            .signal
            .as_deref()
            .unwrap_or(schema.primary_signal().name);
        vec![schema.signal(name)?.name]
    };
    let fs = args.fs.unwrap_or_else(|| {
        signals
            .iter()
            .map(|s| schema.signal(s).expect("listed").rate_hz)
            .fold(0.0, f64::max)
    });
    anyhow::ensure!(
        fs.is_finite() && fs > 0.0,
        "invalid --fs {fs}: must be positive"
    );
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0,
        "invalid --seconds {}: must be positive",
        args.seconds
    );
    anyhow::ensure!(
        args.seconds * fs <= MAX_SIM_SAMPLES,
        "{} s at {fs} Hz is {} samples; at most {MAX_SIM_SAMPLES} per run",
        args.seconds,
        args.seconds * fs
    );
    anyhow::ensure!(
        (0.0..24.0).contains(&args.start_hour),
        "invalid --start-hour {}: 0 to 24",
        args.start_hour
    );
    // A fixed day (2026-01-01 UTC) keeps output reproducible.
    let start_ns = 1_767_225_600_000_000_000 + (args.start_hour * 3600.0 * 1e9) as i64;
    let twin = TwinId::new("sim", &format!("{}-01", args.kind.prefix()))?;
    let mut device = SimDevice::new(twin, args.kind, args.seed);
    if let Some(mode) = &args.fault {
        let fault = Fault {
            mode: mode.parse().map_err(|e: String| anyhow::anyhow!(e))?,
            at_ns: start_ns + (args.fault_at * 1e9) as i64,
        };
        device = device.with_faults(&[fault])?;
    }
    let n = (args.seconds * fs).round() as usize;
    let rows = generate(&mut device, &signals, fs, start_ns, n);
    let mut w = csv::Writer::from_writer(out);
    let mut header = vec!["time_s"];
    header.extend(if signals.len() == 1 {
        vec!["value"]
    } else {
        signals.clone()
    });
    w.write_record(&header)?;
    for (i, row) in rows.iter().enumerate() {
        let mut rec = vec![format!("{}", i as f64 / fs)];
        rec.extend(row.iter().map(|v| v.to_string()));
        w.write_record(&rec)?;
    }
    w.flush()?;
    Ok(())
}

/// Reads one numeric column of a CSV document.
pub fn read_column(input: impl Read, column: Option<&str>) -> anyhow::Result<Vec<f64>> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(input);
    let headers = r
        .headers()
        .map_err(|e| anyhow::anyhow!("line 1: unreadable header: {e}"))?
        .clone();
    let idx = match column {
        Some(c) => headers.iter().position(|h| h == c).ok_or_else(|| {
            anyhow::anyhow!(
                "line 1: no column named {c:?} (columns: {})",
                headers.iter().collect::<Vec<_>>().join(", ")
            )
        })?,
        None => match headers.iter().position(|h| h == "value") {
            Some(i) => i,
            None if headers.len() == 1 => 0,
            None => anyhow::bail!(
                "line 1: no column named \"value\" and {} columns (use --column; columns: {})",
                headers.len(),
                headers.iter().collect::<Vec<_>>().join(", ")
            ),
        },
    };
    let mut out = Vec::new();
    for (i, rec) in r.records().enumerate() {
        let line = i + 2;
        let rec = rec.map_err(|e| anyhow::anyhow!("line {line}: {e}"))?;
        let field = rec
            .get(idx)
            .ok_or_else(|| anyhow::anyhow!("line {line}: missing column {idx}"))?;
        let v: f64 = field
            .parse()
            .map_err(|_| anyhow::anyhow!("line {line}: {:?} is not a number", field))?;
        anyhow::ensure!(
            v.is_finite(),
            "line {line}: {field:?} is not a finite number"
        );
        out.push(v);
    }
    anyhow::ensure!(
        !out.is_empty(),
        "no samples: the input has a header but no rows"
    );
    Ok(out)
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DspOp {
    Stats,
    Fft,
    Psd,
    Envelope,
    Filter,
    Decimate,
    Thd,
}

#[derive(Debug, Args)]
pub struct DspArgs {
    pub op: DspOp,
    /// Sample rate of the input, Hz.
    #[arg(long)]
    pub fs: f64,
    /// Input column (default: `value`, or the only column).
    #[arg(long)]
    pub column: Option<String>,
    /// psd: segment length.
    #[arg(long, default_value_t = 256)]
    pub nperseg: usize,
    /// filter: lowpass, highpass or bandpass.
    #[arg(long, default_value = "lowpass")]
    pub kind: String,
    /// filter: order.
    #[arg(long, default_value_t = 4)]
    pub order: usize,
    /// filter: cutoff frequency in Hz (two, comma-separated, for bandpass).
    #[arg(long, value_delimiter = ',')]
    pub cutoff: Vec<f64>,
    /// decimate: factor.
    #[arg(long, default_value_t = 2)]
    pub factor: usize,
    /// thd: fundamental frequency in Hz (estimated when absent).
    #[arg(long)]
    pub fundamental: Option<f64>,
}

pub fn dsp(args: DspArgs, input: impl Read, out: &mut dyn Write) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.fs.is_finite() && args.fs > 0.0,
        "invalid --fs {}: must be positive",
        args.fs
    );
    let x = read_column(input, args.column.as_deref())?;
    let mut sp = Spectral::new();
    let mut w = csv::Writer::from_writer(out);
    let column =
        |w: &mut csv::Writer<&mut dyn Write>, name: &str, v: &[f64]| -> anyhow::Result<()> {
            w.write_record([name])?;
            for x in v {
                w.write_record([x.to_string()])?;
            }
            Ok(())
        };
    match args.op {
        DspOp::Stats => {
            w.write_record(["statistic", "value"])?;
            for (name, v) in dsp::signal_stats(&x)?.named() {
                w.write_record([name.to_owned(), v.to_string()])?;
            }
        }
        DspOp::Fft => {
            let mag = sp.rfft_magnitude(&x)?;
            w.write_record(["frequency_hz", "magnitude"])?;
            for (f, m) in dsp::rfft_freqs(x.len(), args.fs).iter().zip(&mag) {
                w.write_record([f.to_string(), m.to_string()])?;
            }
        }
        DspOp::Psd => {
            let (f, p) = sp.welch(&x, args.fs, args.nperseg)?;
            w.write_record(["frequency_hz", "psd"])?;
            for (f, p) in f.iter().zip(&p) {
                w.write_record([f.to_string(), p.to_string()])?;
            }
        }
        DspOp::Envelope => column(&mut w, "value", &sp.envelope(&x)?)?,
        DspOp::Filter => {
            let band: BandType = args.kind.parse()?;
            anyhow::ensure!(
                !args.cutoff.is_empty(),
                "filter needs --cutoff HZ (two, comma-separated, for bandpass)"
            );
            let sos = dsp::butter(args.order, &args.cutoff, band, args.fs)?;
            column(&mut w, "value", &dsp::sosfilt(&sos, &x))?;
        }
        DspOp::Decimate => column(&mut w, "value", &dsp::decimate(&x, args.factor)?)?,
        DspOp::Thd => {
            let t = sp.thd(&x, args.fs, args.fundamental)?;
            w.write_record(["thd"])?;
            w.write_record([t.to_string()])?;
        }
    }
    w.flush()?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// gRPC endpoint of any node.
    #[arg(
        long,
        default_value = "http://127.0.0.1:50051",
        env = "TWINMESH_ENDPOINT"
    )]
    pub endpoint: String,
    #[arg(long)]
    pub twin: String,
    #[arg(long)]
    pub signal: String,
    /// CSV with a `value` column and either a `timestamp_ns` column or `--fs`/`--start-ns`.
    #[arg(long, conflicts_with = "json")]
    pub csv: Option<PathBuf>,
    /// JSON `{"start_ns": .., "sample_period_ns": .., "samples": [..]}`.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Sample rate when the CSV has no `timestamp_ns` column.
    #[arg(long)]
    pub fs: Option<f64>,
    /// Time of the first sample when the CSV has no `timestamp_ns` column.
    #[arg(long)]
    pub start_ns: Option<i64>,
    /// Samples per request.
    #[arg(long, default_value_t = 8192)]
    pub chunk: usize,
}

/// Uniformly sampled data to upload.
#[derive(Debug, PartialEq, serde::Deserialize)]
pub struct Series {
    pub start_ns: i64,
    pub sample_period_ns: i64,
    pub samples: Vec<f64>,
}

/// Reads the file of `twinmesh ingest` into a uniformly sampled series.
pub fn read_series(args: &IngestArgs) -> anyhow::Result<Series> {
    if let Some(path) = &args.json {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        let s: Series = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid JSON in {}: {e}", path.display()))?;
        anyhow::ensure!(
            s.sample_period_ns > 0,
            "{}: sample_period_ns must be positive",
            path.display()
        );
        anyhow::ensure!(!s.samples.is_empty(), "{}: no samples", path.display());
        if let Some(i) = s.samples.iter().position(|v| !v.is_finite()) {
            anyhow::bail!("{}: sample {i} is not finite", path.display());
        }
        return Ok(s);
    }
    let path = args
        .csv
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("give --csv FILE or --json FILE"))?;
    let open = || {
        std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))
    };
    let mut r = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(open()?);
    let has_ts = r.headers()?.iter().any(|h| h == "timestamp_ns");
    let samples = read_column(open()?, Some("value"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if !has_ts {
        let fs = args.fs.ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no timestamp_ns column: give --fs and --start-ns",
                path.display()
            )
        })?;
        let start_ns = args.start_ns.ok_or_else(|| {
            anyhow::anyhow!(
                "{} has no timestamp_ns column: give --start-ns",
                path.display()
            )
        })?;
        anyhow::ensure!(fs.is_finite() && fs > 0.0, "invalid --fs {fs}");
        return Ok(Series {
            start_ns,
            sample_period_ns: (1e9 / fs).round() as i64,
            samples,
        });
    }
    let ts = read_column(open()?, Some("timestamp_ns"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let ts: Vec<i64> = ts.iter().map(|t| *t as i64).collect();
    anyhow::ensure!(
        ts.len() >= 2,
        "{}: need at least two rows to know the sample period",
        path.display()
    );
    let period = ts[1] - ts[0];
    anyhow::ensure!(
        period > 0,
        "{}: line 3: timestamps must increase",
        path.display()
    );
    for (i, w) in ts.windows(2).enumerate() {
        anyhow::ensure!(
            w[1] - w[0] == period,
            "{}: line {}: timestamps must be equally spaced ({} ns apart, then {} ns)",
            path.display(),
            i + 3,
            period,
            w[1] - w[0]
        );
    }
    Ok(Series {
        start_ns: ts[0],
        sample_period_ns: period,
        samples,
    })
}

pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let twin: TwinId = args.twin.parse()?;
    anyhow::ensure!(
        args.chunk > 0 && args.chunk <= 1 << 17,
        "--chunk must be in 1..=131072"
    );
    let series = read_series(&args)?;
    let channel = tonic::transport::Channel::from_shared(args.endpoint.clone())?
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.endpoint))?;
    let mut client = TwinServiceClient::new(channel);
    let bar = indicatif::ProgressBar::new(series.samples.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} samples ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("{twin} {}", args.signal));
    let mut stored = 0;
    for (i, chunk) in series.samples.chunks(args.chunk).enumerate() {
        let req = ImportHistoryRequest {
            twin_id: twin.to_string(),
            signal: args.signal.clone(),
            start_ns: series.start_ns + (i * args.chunk) as i64 * series.sample_period_ns,
            sample_period_ns: series.sample_period_ns,
            samples: chunk.to_vec(),
        };
        let resp = client.import_history(req).await.map_err(|s| {
            anyhow::anyhow!(
                "{}: {}",
                twinmesh_nodes::client::code_name(s.code()),
                s.message()
            )
        })?;
        stored += resp.into_inner().samples;
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    println!(
        "{stored} samples of {twin} {} stored ({} to {} ns)",
        args.signal,
        series.start_ns,
        series.start_ns + series.samples.len() as i64 * series.sample_period_ns
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_errors_name_the_line() {
        let err = read_column("value\n1\n2\nabc\n".as_bytes(), None).unwrap_err();
        assert_eq!(err.to_string(), "line 4: \"abc\" is not a number");
        let err = read_column("a,b\n1,2\n".as_bytes(), None).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("line 1: no column named \"value\""),
            "{err}"
        );
        let err = read_column("time_s,value\n0,1\n1\n".as_bytes(), None).unwrap_err();
        assert!(err.to_string().starts_with("line 3:"), "{err}");
        let err = read_column("value\nNaN\n".as_bytes(), None).unwrap_err();
        assert_eq!(err.to_string(), "line 2: \"NaN\" is not a finite number");
        assert_eq!(
            read_column("x\n1.5\n-2\n".as_bytes(), None).unwrap(),
            vec![1.5, -2.0]
        );
        assert!(read_column("value\n".as_bytes(), None).is_err());
    }

    #[test]
    fn dsp_writes_documented_columns() {
        let input = "value\n".to_owned()
            + &(0..256)
                .map(|i| ((i as f64) * 0.3).sin().to_string())
                .collect::<Vec<_>>()
                .join("\n");
        let run = |op, extra: &dyn Fn(&mut DspArgs)| {
            let mut args = DspArgs {
                op,
                fs: 1000.0,
                column: None,
                nperseg: 64,
                kind: "lowpass".into(),
                order: 4,
                cutoff: vec![100.0],
                factor: 2,
                fundamental: None,
            };
            extra(&mut args);
            let mut out = Vec::new();
            dsp(args, input.as_bytes(), &mut out).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(run(DspOp::Stats, &|_| {}).starts_with("statistic,value\ncount,256\n"));
        assert!(run(DspOp::Fft, &|_| {}).starts_with("frequency_hz,magnitude\n0,"));
        assert_eq!(run(DspOp::Psd, &|_| {}).lines().count(), 1 + 33);
        assert_eq!(run(DspOp::Decimate, &|_| {}).lines().count(), 1 + 128);
        assert_eq!(run(DspOp::Filter, &|_| {}).lines().count(), 1 + 256);
        assert_eq!(run(DspOp::Envelope, &|_| {}).lines().next(), Some("value"));
    }
}
