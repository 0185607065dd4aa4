//! `potptq`: quantize llama-family models to power-of-two weights, evaluate and run them.

mod bench;
mod common;
mod eval;
mod export;
mod generate;
mod inspect;
mod quantize;
mod report;
mod sensitivity;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "potptq", version, about = "Power-of-two post-training quantization for llama-family models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture, tensors (names, types, shapes) and parameter count of a model.
    Inspect(inspect::Args),
    /// Perplexity of a model on a text (the Brown test split by default).
    Eval(eval::Args),
    /// Generate text from a prompt.
    Generate(generate::Args),
    /// Quantize with several methods and bit widths; evaluate, save and report them side by side.
    Quantize(quantize::Args),
    /// ΔPPL of quantizing one block, or one kind of linear, at a time.
    Sensitivity(sensitivity::Args),
    /// Write a model in another form (`--dequantized`: f16 safetensors for transformers).
    Export(export::Args),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`potptq inspect | head`), like other command-line tools.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Sensitivity(a) => sensitivity::run(a),
        Command::Export(a) => export::run(a),
        Command::Bench(b) => bench::run(b),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
