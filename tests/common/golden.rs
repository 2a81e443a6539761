//! Golden files: rendered scripts compared byte for byte with files under
//! `tests/golden/`. A mismatch prints a line diff; running the tests with
//! `KIWISPRAY_BLESS=1` rewrites the files from what was rendered instead.

use std::path::PathBuf;

/// The directory of the golden files.
pub fn dir() -> PathBuf {
    super::repo().join("tests/golden")
}

/// Replaces each `(value, marker)` in `text`, e.g. a host's random bootid
/// with `@BOOTID@`. Empty values are skipped.
pub fn normalise(text: &str, replacements: &[(&str, &str)]) -> String {
    let mut out = text.to_string();
    for (value, marker) in replacements {
        if !value.is_empty() {
            out = out.replace(value, marker);
        }
    }
    out
}

/// Compares `actual` with `tests/golden/<name>`, or rewrites the file when
/// `KIWISPRAY_BLESS=1`.
pub fn check(name: &str, actual: &str) {
    let path = dir().join(name);
    if std::env::var("KIWISPRAY_BLESS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        eprintln!("blessed {}", path.display());
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read golden file {}: {e}\n(run with KIWISPRAY_BLESS=1 to create it)\n--- rendered:\n{actual}",
            path.display()
        )
    });
    if expected != actual {
        panic!(
            "{} differs from what was rendered (- golden, + rendered; \
             KIWISPRAY_BLESS=1 rewrites it):\n{}",
            path.display(),
            diff(&expected, actual)
        );
    }
}

/// A line diff (longest common subsequence), `-` for lines only in `a`,
/// `+` for lines only in `b`. Line ends are shown when only they differ.
pub fn diff(a: &str, b: &str) -> String {
    let a: Vec<&str> = a.split_inclusive('\n').collect();
    let b: Vec<&str> = b.split_inclusive('\n').collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let show = |l: &str| {
        if l.ends_with('\n') {
            l.to_string()
        } else {
            format!("{l}\\ (no newline at end)\n")
        }
    };
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            out.push_str(&format!(" {}", show(a[i])));
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+{}", show(b[j])));
            j += 1;
        } else {
            out.push_str(&format!("-{}", show(a[i])));
            i += 1;
        }
    }
    out
}
