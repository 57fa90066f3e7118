"""What a user touches, built on the core (`clapjax.*`), the converter and the trainer: the
`CLAP` inference API, the `clapjax` command line and the demo. Nothing below imports this package."""
