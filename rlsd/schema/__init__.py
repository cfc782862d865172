"""Floor 1, the schema: the typed config (every field documented once), YAML and dotted
overrides, validation with errors that name the field. Imports the algorithms' registry of names
only; loads without torch."""
