"""Writing local files safely: no write through a planted link, into another user's directory,
half-done at the final path, or onto a full disk unnoticed (`safe`)."""
