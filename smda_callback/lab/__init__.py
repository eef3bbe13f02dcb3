"""The lab: the demo, analysis and report, curation, validation and ground-truth experiments, SAE training.

Lab code imports the runtime (`smda_callback`), never the reverse. Install with the `[lab]` extra.
"""
