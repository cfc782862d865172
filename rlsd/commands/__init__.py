"""Floor 4, the commands: `rlsd train | eval | probe | sft | study | compare | report | export |
check-reward` (`cli.py` dispatches, `parser.py` parses) and what they run beyond the step."""
