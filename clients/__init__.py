"""Front-ends of VoiceCloak: the `cloak` command line (clients.cli)."""
