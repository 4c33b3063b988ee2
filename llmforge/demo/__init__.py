"""Built-in demo data sets, shipped as package data and addressed as "demo:NAME" (see llmforge.data)."""
