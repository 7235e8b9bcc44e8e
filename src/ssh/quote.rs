//! Shell words: splitting `-e`/`-x` arguments the way a shell would, and quoting what a
//! remote shell will read.

/// Splits a command line shell-style: whitespace separates words, single and double
/// quotes group, backslash escapes (outside single quotes).
pub fn split_shell(text: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err(format!("unclosed ' in {text:?}")),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x @ ('"' | '\\' | '$' | '`')) => cur.push(x),
                            Some(x) => {
                                cur.push('\\');
                                cur.push(x)
                            }
                            None => return Err(format!("unclosed \" in {text:?}")),
                        },
                        Some(x) => cur.push(x),
                        None => return Err(format!("unclosed \" in {text:?}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(x) => cur.push(x),
                    None => return Err(format!("trailing \\ in {text:?}")),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn splits_like_a_shell() {
        assert_eq!(
            split_shell(r#"-o "StrictHostKeyChecking no" -p 22 'a b'\ c"#).unwrap(),
            vec!["-o", "StrictHostKeyChecking no", "-p", "22", "a b c"]
        );
        assert_eq!(split_shell("  ").unwrap(), Vec::<String>::new());
        assert_eq!(split_shell("''").unwrap(), vec![""]);
        assert!(split_shell("'open").is_err());
        assert!(split_shell("\"open").is_err());
    }

    #[test]
    fn quoting_survives_a_shell() {
        for s in ["plain", "a b", "it's", "$(rm -rf /)", "\"q\"\\"] {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", quote(s)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }
}
