//! Data: the GTEx transcript-expression dataset (CSV or TSV layout), the genome FASTA it is cut from, and the
//! training loader.

pub mod dataset;
pub mod demo;
pub mod export;
pub mod fasta;
pub mod loader;
pub mod predict_tsv;
pub mod prepare;
pub mod records;
pub mod sequences;
pub mod window;

pub use dataset::{
    tissue_mismatch, DataConfig, DataReport, Dataset, ExpressionAt, RowRef, Sample, Split,
    TargetStats,
};
pub use loader::{Batch, Loader, LoaderConfig};
pub use window::EdgePolicy;
