//! The `callforge` binary: `serve`, `run` and `check`.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
};

use anyhow::Context as _;
use callforge::{
    app::App,
    config::Config,
    script::{self, library::load_file, Engine, EngineConfig, Invocation, LoadError, Mode},
};
use clap::{Args, Parser, Subcommand};

/// mimalloc for Rust's allocations: glibc's malloc/free/consolidate were about a sixth of the
/// SIP path's CPU under load (QuickJS keeps libc malloc). The `system-alloc` feature leaves
/// Rust on glibc's malloc too, so heaptrack and valgrind can see every allocation site.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "callforge",
    version,
    about = "ScriptForge-compatible voice, routing and scripting engine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the engine: HTTP API (and, as configured, SIP).
    Serve(ServeArgs),
    /// Run one script and print its result as JSON.
    Run(RunArgs),
    /// Compile scripts and report the first syntax error of each.
    Check {
        #[arg(required = true)]
        scripts: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (default: ./callforge.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP listen address, e.g. 127.0.0.1:8080 (overrides [http] listen).
    #[arg(long)]
    http: Option<std::net::SocketAddr>,
    /// Scripts folder (overrides [scripts] dir).
    #[arg(long)]
    scripts: Option<PathBuf>,
    /// SIP listener, e.g. udp:127.0.0.1:5060 (repeatable; replaces [sip] listen).
    #[arg(long = "sip", value_name = "PROTO:HOST:PORT")]
    sip: Vec<callforge::sip::ListenSpec>,
    /// Server log format on stderr: `text` (coloured only on a terminal) or `json`.
    #[arg(long, value_enum, default_value_t)]
    log_format: callforge::logging::LogFormat,
}

#[derive(Args)]
struct RunArgs {
    script: PathBuf,
    #[arg(long)]
    mode: Option<Mode>,
    /// Input data as JSON text ('-' reads standard input).
    #[arg(long, conflicts_with_all = ["data_file"])]
    data: Option<String>,
    /// Input data from a file ('-' reads standard input).
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// Vars TOML merged into the data as top-level keys.
    #[arg(long)]
    vars: Option<PathBuf>,
    /// The function to call (driver mode).
    #[arg(long = "fn")]
    function: Option<String>,
    /// Configuration file for the host modules (default: ./callforge.toml when it exists).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    callforge::memory::limit_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            callforge::logging::init(args.log_format);
            match serve(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("callforge: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => run(args),
        Command::Check { scripts } => check(&scripts),
    }
}

/// The configuration file `serve` and `run` read: `--config`, else ./callforge.toml if present.
fn config_path(path: Option<&Path>) -> Option<PathBuf> {
    match path {
        Some(path) => Some(path.to_path_buf()),
        None if Path::new("callforge.toml").exists() => Some(PathBuf::from("callforge.toml")),
        None => None,
    }
}

fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match config_path(path) {
        Some(path) => Config::load(&path)?,
        None => Config::default(),
    })
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    raise_open_file_limit();
    limit_malloc_arenas();
    let path = config_path(args.config.as_deref());
    let demo = path.is_none();
    let mut config = match &path {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default(),
    };
    if let Some(addr) = args.http {
        config.http.listen = addr;
    }
    if let Some(dir) = args.scripts {
        config.scripts.dir = dir;
    }
    if !args.sip.is_empty() {
        config.sip.listen = args.sip.iter().map(ToString::to_string).collect();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let built = callforge::modules::build(&config, true)
        .with_context(|| "bad configuration".to_string())?;
    runtime.block_on(async {
        let app = App::new(config, built.modules)?
            .with_config_path(path)
            .with_demo_banner(demo)
            .with_records(built.records)
            .with_send(built.send)
            .with_originator(built.originator);
        built.jobs.start(app.engine.clone(), app.library.clone());
        app.serve().await?;
        Ok(())
    })
}

fn read_data(args: &RunArgs) -> anyhow::Result<serde_json::Value> {
    let from_stdin = args.data.as_deref() == Some("-")
        || args
            .data_file
            .as_ref()
            .is_some_and(|p| p.as_os_str() == "-");
    let text = match (&args.data, &args.data_file) {
        _ if from_stdin => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading data from stdin")?;
            s
        }
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read data file {}", path.display()))?,
        (None, None) => return Ok(serde_json::json!({})),
    };
    serde_json::from_str(&text).context("--data is not valid JSON")
}

fn run(args: RunArgs) -> ExitCode {
    let script = match load_file(&args.script) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            report_load_error(&args.script, &e);
            return ExitCode::from(1);
        }
    };
    let mut data = match read_data(&args) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("callforge: {e:#}");
            return ExitCode::from(1);
        }
    };
    if let Some(path) = &args.vars {
        match script::vars::load(path) {
            Ok(vars) => data = script::vars::merge(data, &vars),
            Err(e) => {
                eprintln!("callforge: {e}");
                return ExitCode::from(1);
            }
        }
    }
    // The store opens on first use: a script that never touches it creates no file.
    let modules = match load_config(args.config.as_deref())
        .and_then(|c| Ok(callforge::modules::build(&c, false)?))
    {
        Ok(built) => built.modules,
        Err(e) => {
            eprintln!("callforge: bad configuration: {e:#}");
            return ExitCode::from(1);
        }
    };
    // The script imports other scripts from its own folder.
    let mut modules = modules;
    let folder = match args.script.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    modules.set_scripts(std::sync::Arc::new(script::ScriptLibrary::new(
        folder,
        script::LibraryLimits::default(),
    )));
    let mode = args.mode.unwrap_or_else(|| Engine::default_mode(&script));
    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let engine = Engine::start(EngineConfig {
                    workers: 1,
                    modules,
                    ..EngineConfig::default()
                })?;
                let mut inv = Invocation::new(script, mode, data);
                inv.function = args.function.clone();
                Ok(engine.run(inv).await?)
            })
        });
    let output = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("callforge: {e:#}");
            return ExitCode::from(1);
        }
    };
    for line in &output.logs {
        eprintln!("[{:?}] {}", line.level, line.message);
    }
    match output.result {
        Ok(result) => {
            println!("{result}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "{}",
                serde_json::json!({"error": {"code": e.code, "message": e.message}})
            );
            ExitCode::from(2)
        }
    }
}

fn report_load_error(path: &Path, e: &LoadError) {
    match e {
        LoadError::Compile(c) => {
            eprintln!("{}:{}:{}: {}", path.display(), c.line, c.column, c.message)
        }
        other => eprintln!("callforge: {other}"),
    }
}

fn check(scripts: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for path in scripts {
        match load_file(path) {
            Ok(s) => println!(
                "{}: ok ({}{})",
                path.display(),
                match s.kind {
                    script::SourceKind::Global => "script",
                    script::SourceKind::Module => "module",
                },
                if s.is_driver { ", driver" } else { "" }
            ),
            Err(e) => {
                report_load_error(path, &e);
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Every call holds two UDP sockets (RTP and RTCP): lift the soft open-file limit to the hard
/// one, as servers do, so a thousand calls do not run into Debian's default of 1,024.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = limit.rlim_max;
            limit.rlim_cur = wanted;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                tracing::warn!("cannot raise the open-file limit to {wanted}");
            }
        }
    }
}

/// glibc gives each thread that allocates its own arena, which fragments memory when calls
/// move between the async runtime's threads and the script workers; two arenas keep the
/// resident size per call down without measurable contention at 2 cores.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
