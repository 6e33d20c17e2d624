//! Reports as pictures: `mlops report` draws a report file ([`crate::report::ReportFile`])
//! as one self-contained HTML page ([`html`], charts from [`svg`]) or as Markdown tables
//! for CI job summaries ([`markdown`]), reading each step's typed report ([`view`]).
//!
//! It sits above every stage (it reads their typed reports) and nothing but the CLI uses
//! it, so `report` stays a module the stages themselves can use without a cycle.

pub mod html;
pub mod markdown;
pub mod svg;
pub mod view;
