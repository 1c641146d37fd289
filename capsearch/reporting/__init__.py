"""Reading run folders for people: report.md, plots, statistics over seeds, dominance."""
