//! Resident memory of this process, from `/proc/self/status` (Linux): what a loaded model
//! costs, to compare with its file size.

use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Resident {
    /// `VmRSS`: resident now.
    pub bytes: u64,
    /// `VmHWM`: the peak so far (loading reads the file while building the tensors).
    pub peak_bytes: u64,
}

/// `None` where `/proc/self/status` is not available.
pub fn resident() -> Option<Resident> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kb: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    };
    Some(Resident { bytes: field("VmRSS:")?, peak_bytes: field("VmHWM:")? })
}

impl std::fmt::Display for Resident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} MB resident (peak {:.1} MB)", self.bytes as f64 / 1e6, self.peak_bytes as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_its_own_status() {
        if let Some(r) = super::resident() {
            assert!(r.bytes > 0 && r.peak_bytes >= r.bytes);
        }
    }
}
