//! lc.toml(5): the configuration man page, rendered from `docs/CONFIG.md` (the one
//! description of the config keys) so the two cannot drift. lc(8) comes from the clap
//! definitions in `main.rs`.

const CONFIG_MD: &str = include_str!("../docs/CONFIG.md");

/// Escapes text for roff and drops Markdown inline marks (code spans, links).
fn text(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    // [label](target) -> label
    while let Some(open) = rest.find('[') {
        match (rest[open..].find("]("), rest[open..].find(')')) {
            (Some(mid), Some(close)) if mid < close => {
                out.push_str(&rest[..open]);
                out.push_str(&rest[open + 1..open + mid]);
                rest = &rest[open + close + 1..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    let out = out.replace('\\', "\\e").replace('`', "").replace("**", "");
    match out.chars().next() {
        Some('.') | Some('\'') => format!("\\&{out}"),
        _ => out,
    }
}

fn cells(line: &str) -> Vec<&str> {
    line.trim()
        .trim_matches('|')
        .split(" | ")
        .map(|c| c.trim())
        .collect()
}

/// The lc.toml(5) page in roff.
pub fn config_page() -> String {
    let mut out = String::from(
        ".TH LC.TOML 5 \"\" \"lc\" \"File Formats\"\n.SH NAME\nlc.toml \\- configuration of the lc cache daemon\n",
    );
    let mut header: Vec<&str> = Vec::new();
    let mut in_code = false;
    for line in CONFIG_MD.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            out += if in_code { ".nf\n" } else { ".fi\n" };
            continue;
        }
        if in_code {
            out += &text(line);
            out.push('\n');
            continue;
        }
        if let Some(h) = line.strip_prefix("# ") {
            out += &format!(".SH DESCRIPTION\n{}\n.PP\n", text(h));
        } else if let Some(h) = line.strip_prefix("## ").or(line.strip_prefix("### ")) {
            out += &format!(".SH {}\n", text(h).to_uppercase());
        } else if line.starts_with('|') {
            if line.chars().all(|ch| matches!(ch, '|' | '-' | ':' | ' ')) {
                continue;
            }
            let c = cells(line);
            if header.is_empty() {
                header = c;
                continue;
            }
            let (key, rest) = c.split_first().expect("a cell");
            let (meaning, attrs) = rest.split_last().unwrap_or((&"", &[]));
            let attrs: Vec<String> = header
                .iter()
                .skip(1)
                .zip(attrs)
                .filter(|(_, v)| !v.is_empty())
                .map(|(h, v)| format!("{}: {}", text(h), text(v)))
                .collect();
            out += &format!(".TP\n.B {}\n", text(key));
            if !attrs.is_empty() {
                out += &format!("({})\n.br\n", attrs.join("; "));
            }
            out += &text(meaning);
            out.push('\n');
        } else if line.trim().is_empty() {
            header.clear();
            out += ".PP\n";
        } else {
            out += &text(line);
            out.push('\n');
        }
    }
    out += ".SH SEE ALSO\nlc(8), targetcli(8)\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_config_key_of_the_document_is_on_the_page() {
        let page = config_page();
        assert!(page.starts_with(".TH LC.TOML 5"));
        let keys: Vec<&str> = CONFIG_MD
            .lines()
            .filter(|l| l.starts_with("| `"))
            .filter_map(|l| l.split('`').nth(1))
            .collect();
        assert!(keys.len() > 15, "{keys:?}");
        for k in keys {
            assert!(page.contains(&format!(".B {}\n", text(k))), "{k} missing");
        }
        assert!(!page.contains('`') && !page.contains("---"));
        assert!(page.lines().all(|l| !l.starts_with('.')
            || l.starts_with(".TH")
            || l.starts_with(".SH")
            || l.starts_with(".PP")
            || l.starts_with(".TP")
            || l.starts_with(".B ")
            || l.starts_with(".br")
            || l.starts_with(".nf")
            || l.starts_with(".fi")));
    }

    #[test]
    fn markdown_marks_become_plain_roff() {
        assert_eq!(text("see [`x`](../y.md) and `z`"), "see x and z");
        assert_eq!(text(".dot a\\b"), "\\&.dot a\\eb");
    }
}
