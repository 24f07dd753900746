"""Agent runs: what each step kept, how steps make runs, and the views of a run (timeline,
replay, asciicast, JSON lines, evidence). Pure: the store reads and writes the rows."""
