//! `mlops report`: draw a report file as one self-contained HTML page, or its key tables as
//! Markdown for a CI job summary. The rendering is the library's (`mlops::render::html`,
//! `mlops::render::markdown`); this only reads, calls and writes.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use mlops::report::{ReportFile, StepReport};

use super::printer::Printer;
use super::{Context, Outcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Html,
    Md,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct ReportCmdArgs {
    /// A report file (`--report FILE` of any step, or a pipeline's report.json)
    #[arg(value_name = "REPORT.json")]
    pub report: PathBuf,
    /// Where to write: html defaults to REPORT.html beside the report, md to stdout
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// `html`: a page with charts (inline SVG, no scripts, works offline); `md`: the key
    /// tables as Markdown (e.g. `>> $GITHUB_STEP_SUMMARY`)
    #[arg(long, value_enum, default_value_t = Format::Html)]
    pub format: Format,
}

pub(crate) fn run(args: &ReportCmdArgs, ctx: &Context) -> anyhow::Result<Outcome> {
    let report = ReportFile::load(
        &args.report,
        "pass a file written by `--report` or `mlops pipeline`",
    )?;
    let source = args.report.display().to_string();
    match args.format {
        Format::Html => {
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| args.report.with_extension("html"));
            write_html(&report, &source, &out, &ctx.printer)?;
        }
        Format::Md => {
            let text = mlops::render::markdown::render(&report, &source);
            match &args.out {
                Some(out) => {
                    mlops::io::write_atomically(out, text.as_bytes())?;
                    ctx.printer.note(&format!("markdown: `{}`", out.display()));
                }
                None => std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes())?,
            }
        }
    }
    Ok(Outcome::Success)
}

/// Renders `report` to `out` (atomically) and says where, with the steps it could not draw.
pub(crate) fn write_html(
    report: &ReportFile,
    source: &str,
    out: &Path,
    printer: &Printer,
) -> anyhow::Result<()> {
    let page = mlops::render::html::render(report, source);
    mlops::io::write_atomically(out, page.as_bytes())?;
    for (i, step) in report.steps.iter().enumerate() {
        if let mlops::render::view::StepView::Unreadable(e) = mlops::render::view::view(step) {
            printer.note(&format!(
                "warning: step {} ({}) not drawn, its figures are unreadable: {e}",
                i + 1,
                step.step
            ));
        }
    }
    printer.note(&format!(
        "html report: `{}` ({} KiB)",
        out.display(),
        page.len().div_ceil(1024)
    ));
    Ok(())
}

/// `--html FILE` of a step command: that step alone as a page.
pub(crate) fn step_html(step: &StepReport, out: &Path, printer: &Printer) -> anyhow::Result<()> {
    let mut report = ReportFile::new();
    report.steps.push(step.clone());
    write_html(&report, &format!("mlops {}", step.step), out, printer)
}
