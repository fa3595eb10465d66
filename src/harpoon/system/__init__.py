"""harpoon's own services and the front door (`harpoon system`, `harpoon run …`,
`harpoon doctor`).

harpoon runs a containerd of its own (state under harpoon's directories, harpoon the
default runtime, CNI configured for nerdctl) so that a user needs no system containerd
and no flags: `harpoon run …` hands its arguments to nerdctl with harpoon's
`nerdctl.toml` once the services are up. `layout` says where everything lives, `config`
renders the files, `network` harpoon's default CNI network, `services` starts, stops and
checks the daemons (one `Service` each: buildkitd joins as one more), `cleanup` removes
what a crashed service left, `doctor` checks every piece, `frontdoor` execs nerdctl,
`cli` is the click commands.
"""
