"""Stand-ins for tests and the demo, not for training runs: a tiny *random* CLIP (`tiny_clip`)
and the tests' small synthetic datasets (`synthetic_data`). Production code imports nothing from
here except `text_adapt`, which writes a tiny CLIP when `text.tiny_clip_dir` is set (the demo)."""
