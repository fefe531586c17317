"""Modbus TCP server for twinmesh's device tests (pymodbus 3.8).

Usage: python3 modbus_server.py PORT

Serves 100 holding registers on 127.0.0.1:PORT (any unit id) holding one value of each
register type the gateway reads, big-endian words. Reads past register 99 answer with
an IllegalAddress exception. Prints `ready` once it listens.
"""

import asyncio
import struct
import sys

from pymodbus.datastore import (
    ModbusSequentialDataBlock,
    ModbusServerContext,
    ModbusSlaveContext,
)
from pymodbus.server import StartAsyncTcpServer


def words(fmt, value):
    """Big-endian 16-bit words of `value` packed as struct format `fmt`."""
    raw = struct.pack(">" + fmt, value)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def registers():
    regs = [0] * 100
    regs[0:1] = words("h", 655)  # i16: cpu_temperature 65.5 at scale 0.1
    regs[1:2] = words("H", 4321)  # u16: fan_speed 4321
    regs[2:4] = words("I", 70000)  # u32: power 700.0 at scale 0.01
    regs[4:6] = words("i", -500)  # i32: wind turbine power -50.0 at scale 0.1
    regs[6:8] = words("f", 0.25)  # f32: job_load 0.25
    regs[8:9] = words("H", 65000)  # u16: a rotor speed far out of its kind's range
    return regs


async def main(port):
    # pymodbus adds 1 to every protocol address: the block starts at 1 so register 0
    # is the first value.
    block = ModbusSequentialDataBlock(1, registers())
    context = ModbusServerContext(slaves=ModbusSlaveContext(hr=block), single=True)
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, lambda: print("ready", flush=True))
    await StartAsyncTcpServer(context=context, address=("127.0.0.1", port))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
