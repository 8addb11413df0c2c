"""twistd plugin: `twistd -n gateway --config FILE` runs the mail gateway."""

from __future__ import annotations

import sys

from twisted.application.service import IService, IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Runs the mail gateway: POP3 listeners for devices, proxied to the "
        "upstream accounts the configuration names. Without --config, the "
        "GATEWAY_CONFIG environment variable, else /etc/gateway/gateway.toml."
    )
    optParameters = [
        ["config", "c", None, "Path of the gateway's TOML configuration file."],
    ]


@implementer(IServiceMaker, IPlugin)
class GatewayServiceMaker:
    tapname = "gateway"
    description = "Mail gateway for legacy POP3/SMTP devices"
    options = Options

    def makeService(self, options: Options) -> IService:
        # Imported here: twistd imports every plugin module to list them, and
        # only this command needs the gateway (and the installed reactor).
        from twisted.internet import reactor

        from gateway.config import ConfigError, find_config_path, load_config
        from gateway.logs import with_json_log
        from gateway.service import make_service
        from gateway.tls import TLSSetupError

        path = find_config_path(options["config"])
        try:
            config = load_config(path)
            service = make_service(config, reactor)
            if config.log.format == "json":
                # twistd's own options (--logfile, --nodaemon) say where to write.
                return with_json_log(service, getattr(options, "parent", None))
            return service
        except ConfigError as e:
            print(f"gateway: configuration {path} has problems:", file=sys.stderr)
            for problem in e.problems:
                print(f"  {problem}", file=sys.stderr)
        except (TLSSetupError, OSError) as e:
            print(f"gateway: cannot start with {path}: {e}", file=sys.stderr)
        raise SystemExit(1)


serviceMaker = GatewayServiceMaker()
