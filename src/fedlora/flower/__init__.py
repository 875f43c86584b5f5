"""fedlora on Flower: the same methods over a real SuperLink and SuperNodes (optional extra).

    pip install 'fedlora[flower]'
    fedlora flower local CONFIG --clients 3        # everything on this machine, then stopped
    fedlora flower app CONFIG --out app/           # the folder `flwr run app/ <superlink>` submits

Modules: `wire` (safetensors payloads in Flower records), `config` (run/node config),
`node` (a SuperNode's ClientApp logic), `coordinator` (the ServerApp's logic), `apps`
(`server_app`, `client_app`), `deploy` (app folder, local launcher), `cli`. See docs/flower.md.
Nothing here is imported by `import fedlora`; flwr is only needed when these modules are used.
"""
