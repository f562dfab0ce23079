//! `muster completions bash|zsh|fish`: shell completion scripts on stdout.

use clap::CommandFactory;

/// Flags of `muster completions`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Install, e.g.:\n  \
    muster completions bash > /etc/bash_completion.d/muster\n  \
    muster completions zsh > \"${fpath[1]}/_muster\"\n  \
    muster completions fish > ~/.config/fish/completions/muster.fish")]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Shells with completion scripts.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    /// GNU bash.
    Bash,
    /// Z shell.
    Zsh,
    /// The friendly interactive shell.
    Fish,
}

/// Prints the completion script of the `muster` command line `C`.
pub fn run<C: CommandFactory>(args: CompletionsArgs) -> anyhow::Result<()> {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut C::command(), "muster", &mut script);
    crate::output::print(&String::from_utf8_lossy(&script))
}
