"""The `caedfkd` command: the subcommand table, the distill launcher, the offline demo."""
