"""Old import paths, kept for one release. The loop moved to `winnow.loops`, the commands to `winnow.recipes`,
the process set-up to `winnow.setup`: `winnow.runtime.rl.train` is `winnow.recipes.rl.train`,
`winnow.runtime.train_preference.train_preference` is `winnow.recipes.preference.train_preference`."""
