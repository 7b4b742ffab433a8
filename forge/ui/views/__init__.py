"""The dashboard's pages; each `render(run, ...)` draws one page from a read-only `forge.ui.data.RunRoot`."""
