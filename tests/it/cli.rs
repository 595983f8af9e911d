//! The command line itself: completion scripts and examples in every `--help`.

use vm_tests::xtask;

/// The subcommands `xtask --help` lists (clap's own `help` left out).
fn subcommands() -> Vec<String> {
    let help = xtask(&["--help"]);
    help.expect_code(0);
    let listed: Vec<String> = help
        .stdout
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect();
    assert!(listed.len() >= 9, "{help:#?}");
    listed
}

#[test]
fn bash_completions_name_every_subcommand() {
    let run = xtask(&["completions", "bash"]);
    run.expect_code(0);
    assert!(run.stdout.contains("complete -F _xtask"), "not a bash completion script: {}", run.stdout);
    for sub in subcommands() {
        assert!(run.stdout.contains(&sub), "`{sub}` is not completed");
    }
    // Options of a subcommand too.
    for option in ["--system", "--json", "--forward", "--repair", "--quiet"] {
        assert!(run.stdout.contains(option), "`{option}` is not completed");
    }
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let other = xtask(&["completions", shell]);
        other.expect_code(0);
        assert!(other.stdout.contains("build-in-vm"), "{shell}: {other:#?}");
    }
    let bad = xtask(&["completions", "csh"]);
    bad.expect_code(2);
    assert!(bad.stdout.is_empty() && bad.stderr.contains("csh"), "{bad:#?}");
}

#[test]
fn every_subcommand_help_shows_an_example() {
    let mut subs: Vec<Vec<String>> = subcommands().into_iter().map(|s| vec![s]).collect();
    subs.push(vec!["store".into(), "verify".into()]);
    subs.push(vec![]);
    for sub in subs {
        let mut args: Vec<&str> = sub.iter().map(String::as_str).collect();
        args.push("--help");
        let run = xtask(&args);
        run.expect_code(0);
        let lines: Vec<&str> = run.stdout.lines().collect();
        let at = lines.iter().position(|l| *l == "Example:" || *l == "Examples:");
        let example = at.and_then(|i| lines.get(i + 1)).copied().unwrap_or_default();
        assert!(example.starts_with("  cargo "), "`{}` shows no example: {}", args.join(" "), run.stdout);
        let named = sub.first().is_none_or(|s| example.contains(s.as_str()));
        assert!(named, "the example of `{}` does not use it: {example}", args.join(" "));
    }
}
