"""OPC UA server for twinmesh's device tests (asyncua 1.1).

Usage: python3 opcua_server.py PORT

Serves on opc.tcp://127.0.0.1:PORT, security none, namespace 2:
  Spindle.Speed     Double, counts up by 1 every 100 ms from 1000
  Spindle.Load      Double, 500 (outside a spindle's 0..150 %)
  Spindle.Status    String "hot" (not a number)
  Spindle.Vibration Double NaN
  Spindle.Override  Double, writable; every change is printed as `override=VALUE`
Prints `ready` once it listens.
"""

import asyncio
import math
import sys

from asyncua import Server, ua


async def main(port):
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    ns = await server.register_namespace("urn:twinmesh:test")
    assert ns == 2, ns
    objects = server.nodes.objects
    spindle = await objects.add_object(ua.NodeId("Spindle", ns), "Spindle")

    async def var(name, value, vtype):
        return await spindle.add_variable(ua.NodeId(f"Spindle.{name}", ns), name, ua.Variant(value, vtype))

    speed = await var("Speed", 1000.0, ua.VariantType.Double)
    await var("Load", 500.0, ua.VariantType.Double)
    await var("Status", "hot", ua.VariantType.String)
    await var("Vibration", math.nan, ua.VariantType.Double)
    override = await var("Override", 100.0, ua.VariantType.Double)
    await override.set_writable()
    async with server:
        print("ready", flush=True)
        last = await override.read_value()
        value = 1000.0
        tick = 0
        while True:
            await asyncio.sleep(0.05)
            tick += 1
            if tick % 2 == 0:
                value += 1.0
                await speed.write_value(value)
            now = await override.read_value()
            if now != last:
                print(f"override={now}", flush=True)
                last = now


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
