use candela::config::{Cli, Command};
use candela::{App, Config};
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "candela=info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Fetch { model, args }) => fetch(model, &args).await,
        Some(Command::Serve(args)) => serve(&args).await,
        Some(Command::Plan {
            session_tokens,
            gpu_memory,
            args,
        }) => plan(session_tokens, gpu_memory, &args).await,
        Some(Command::Doctor {
            tokens,
            prompt,
            no_cpu,
            quick,
            prefill,
            args,
        }) => doctor(tokens, prompt, no_cpu, (quick, prefill), &args).await,
        None => serve(&cli.serve).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("candela: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: &candela::config::ServeArgs) -> Result<(), candela::Error> {
    let cfg = Config::load(args)?;
    let app = App::build(cfg.clone()).await?;
    eprintln!(
        "candela: listening on http://{} (model{} `{}` loading; /health turns 200 when ready)",
        app.local_addr()?,
        if cfg.models.len() > 1 { "s" } else { "" },
        cfg.models.join("`, `")
    );
    app.run().await
}

async fn doctor(
    tokens: usize,
    prompt: String,
    no_cpu: bool,
    (quick, prefill): (bool, bool),
    args: &candela::config::ServeArgs,
) -> Result<(), candela::Error> {
    let cfg = Config::load(args)?;
    let spec = cfg
        .models
        .first()
        .cloned()
        .unwrap_or_else(|| "default".into());
    tokio::task::spawn_blocking(move || {
        candela::cli::doctor::run(
            &spec,
            &cfg.data_dir,
            &cfg.device,
            cfg.ctx_size,
            tokens,
            &prompt,
            candela::cli::doctor::Checks {
                cpu: !no_cpu,
                quick,
                prefill,
            },
        )
    })
    .await
    .map_err(|e| candela::Error::Config(format!("doctor task failed: {e}")))??;
    Ok(())
}

async fn fetch(
    model: Option<String>,
    args: &candela::config::ServeArgs,
) -> Result<(), candela::Error> {
    let cfg = Config::load(args)?;
    // `candela fetch NAME`, else every configured model.
    let specs = model.map(|m| vec![m]).unwrap_or(cfg.models);
    for spec in specs {
        let dir = cfg.data_dir.clone();
        let r = tokio::task::spawn_blocking(move || candela::engine::fetch::resolve(&spec, &dir))
            .await
            .map_err(|e| candela::Error::Config(format!("fetch task failed: {e}")))??;
        println!("{}", r.path.display());
    }
    Ok(())
}

async fn plan(
    session_tokens: usize,
    gpu_memory: Option<String>,
    args: &candela::config::ServeArgs,
) -> Result<(), candela::Error> {
    let cfg = Config::load(args)?;
    let n = cfg.models.len();
    let gpu = candela::cli::plan::gpu_memory(&cfg.device, gpu_memory.as_deref())
        .map_err(candela::Error::Config)?;
    for (i, spec) in cfg.models.iter().enumerate() {
        let (spec, dir) = (spec.clone(), cfg.data_dir.clone());
        let r = tokio::task::spawn_blocking(move || candela::engine::fetch::resolve(&spec, &dir))
            .await
            .map_err(|e| candela::Error::Config(format!("fetch task failed: {e}")))??;
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        // With several models each gets an even share of the KV budget (as when serving).
        let p = candela::cli::plan::plan(
            &r.path,
            &r.id,
            cfg.kv_dtype,
            (cfg.kv_budget / n) as u64,
            session_tokens,
            (sys.total_memory(), sys.available_memory()),
        )?;
        if i > 0 {
            println!();
        }
        print!("{}", p.render());
        if let Some(g) = gpu {
            let t = p.tiers(
                g,
                cfg.kv_device_budget.split(n),
                cfg.kv_disk_budget / n as u64,
            );
            print!("{}", t.render(p.session_tokens, p.session_bytes));
        }
    }
    Ok(())
}
