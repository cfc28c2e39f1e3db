"""The subcommands of the ``coloproxy`` command line (shell), one module per subcommand or
group: :mod:`~coloproxy.commands.compare_pcap`, :mod:`~coloproxy.commands.check_config`,
:mod:`~coloproxy.commands.control` (status, checkpoint, set-period, reprotect: a running
proxy, over its control socket) and :mod:`~coloproxy.commands.daemon` (run, teardown).

Each declares its arguments and does its work; :mod:`coloproxy.cli` builds the parser from
them (:class:`~coloproxy.commands.subcommand.Subcommand`) and maps trouble to exit codes.
"""
