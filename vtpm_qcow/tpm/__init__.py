"""Talking to a TPM: launching swtpm, TPM 2.0 commands, and the qtest TIS transport."""
