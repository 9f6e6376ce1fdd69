//! The policy examples people will copy: every TOML block in the policy
//! reference and the example policy are valid. Blocks marked `toml,invalid`
//! are rejected instead, with exactly the errors shown in the `text` block
//! right after them, if there is one.

use std::{fs, path::PathBuf};

use mesh_agent::policy;

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// A fenced code block of a Markdown document.
struct Block {
    info: String,
    /// Of the opening fence, 1-based.
    line: usize,
    body: String,
}

fn fenced_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in markdown.lines().enumerate() {
        match (line.strip_prefix("```"), open.take()) {
            (Some(info), None) => {
                open = Some(Block {
                    info: info.trim().to_owned(),
                    line: index + 1,
                    body: String::new(),
                });
            }
            (Some(_), Some(block)) => blocks.push(block),
            (None, Some(mut block)) => {
                block.body.push_str(line);
                block.body.push('\n');
                open = Some(block);
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "unclosed code block");
    blocks
}

#[test]
fn reference_examples_are_valid_or_fail_as_shown() {
    let blocks = fenced_blocks(&fs::read_to_string(repo_file("docs/policy.md")).unwrap());
    let (mut valid, mut invalid) = (0, 0);
    for (index, block) in blocks.iter().enumerate() {
        let result = policy::parse("policy.toml", &block.body);
        match block.info.as_str() {
            "toml" => {
                if let Err(errors) = result {
                    panic!("the example at line {} is rejected:\n{errors}", block.line);
                }
                valid += 1;
            }
            "toml,invalid" => {
                let Err(errors) = result else {
                    panic!("the invalid example at line {} is accepted", block.line);
                };
                if let Some(shown) = blocks.get(index + 1).filter(|next| next.info == "text") {
                    assert_eq!(
                        format!("{errors}\n"),
                        shown.body,
                        "errors of the example at line {}",
                        block.line
                    );
                }
                invalid += 1;
            }
            _ => {}
        }
    }
    assert!(
        valid >= 5 && invalid >= 1,
        "{valid} valid, {invalid} invalid"
    );
}

#[test]
fn example_policy_is_valid() {
    let policy = policy::load(&repo_file("examples/policy.toml")).unwrap();
    assert_eq!(policy.summary(), "4 identities, 3 services, 4 grants");
}

#[test]
fn demo_policies_are_valid() {
    for (file, summary) in [
        (
            "examples/demo/policy.toml",
            "2 identities, 1 service, 1 grant",
        ),
        (
            "examples/demo/policy-updated.toml",
            "2 identities, 1 service, 2 grants",
        ),
    ] {
        assert_eq!(
            policy::load(&repo_file(file)).unwrap().summary(),
            summary,
            "{file}"
        );
    }
}
