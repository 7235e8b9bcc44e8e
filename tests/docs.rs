//! What the documentation says is what the code does: the exit-code table of `--help` and
//! the README is the one in the code, and the crate's layers import only downwards.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::Path;

/// The rows `| code | meaning |` of the README's "### Exit codes" table.
fn readme_exit_codes() -> BTreeSet<(i32, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = readme
        .split("### Exit codes")
        .nth(1)
        .expect("the README has an exit-code section");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            Some((cells.first()?.parse().ok()?, cells.get(1)?.to_string()))
        })
        .collect()
}

#[test]
fn readme_and_help_show_the_exit_codes_the_code_uses() {
    let table: BTreeSet<(i32, String)> = blocksync::testing::exit_codes()
        .into_iter()
        .map(|(c, m)| (c, m.to_string()))
        .collect();
    assert_eq!(table.len(), 20, "{table:?}");
    assert_eq!(readme_exit_codes(), table, "README.md's exit-code table");

    let out = run(&["--help"]);
    assert_eq!(code(&out), 0);
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    let listed = help
        .split("Exit codes:")
        .nth(1)
        .expect("--help lists exit codes");
    let rows: BTreeSet<(i32, String)> = listed
        .lines()
        .filter_map(|l| {
            let (c, m) = l.trim().split_once("  ")?;
            Some((c.parse().ok()?, m.trim().to_string()))
        })
        .collect();
    let plain: BTreeSet<(i32, String)> = table
        .iter()
        .map(|(c, m)| (*c, m.replace('`', "")))
        .collect();
    assert_eq!(rows, plain, "--help's exit codes");
}

/// The sudoers rule the README gives for `-s` is the one the code's root step needs
/// (tests/deploy.rs runs `-s` under exactly that rule).
#[test]
fn readme_gives_the_sudoers_rule_the_code_needs() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let rule = blocksync::testing::sudoers_rule("backup");
    assert!(
        readme.lines().any(|l| l.trim() == rule),
        "README.md lacks the sudoers rule:\n{rule}"
    );
}

/// The folders of src/, lowest layer first; a module may import from its own folder and
/// from those before it, never from one after it.
const LAYERS: [&[&str]; 9] = [
    &["error", "size", "hash"],
    &["io"],
    &["digestfile"],
    &["journal"],
    &["engine"],
    &["wire"],
    &["ssh"],
    &["offline"],
    &["app"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn lower_layers_never_import_upper_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut seen = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel.iter().next().unwrap().to_str().unwrap();
        let top = top.strip_suffix(".rs").unwrap_or(top);
        let Some(own) = layer_of(top) else {
            continue; // lib.rs and main.rs sit above every layer
        };
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue; // docs may name any layer
            }
            for used in line.split("crate::").skip(1) {
                let module: String = used
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                seen += 1;
                match layer_of(&module) {
                    Some(l) if l > own => {
                        wrong.push(format!("{}:{}: {}", rel.display(), n + 1, line.trim()))
                    }
                    Some(_) => {}
                    None => wrong.push(format!(
                        "{}:{}: crate::{module} is in no layer",
                        rel.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(
        seen > 100,
        "only {seen} crate:: paths found: is src/ where it was?"
    );
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}
