/* Generic script droppers and download cradles. Cheap: a few long literals. */

rule PowerShell_Download_Cradle
{
    meta:
        description = "PowerShell that downloads and immediately executes code"
        severity = "high"
        author = "Sentinel"
    strings:
        $ps = "powershell" nocase ascii wide
        $dl1 = "DownloadString(" nocase ascii wide
        $dl2 = "DownloadData(" nocase ascii wide
        $dl3 = "Invoke-WebRequest" nocase ascii wide
        $ex1 = "Invoke-Expression" nocase ascii wide
        $ex2 = "IEX(" nocase ascii wide
        $ex3 = "IEX (" nocase ascii wide
    condition:
        filesize < 5MB and $ps and any of ($dl*) and any of ($ex*)
}

rule Windows_Script_Shell_Dropper
{
    meta:
        description = "JScript/VBScript/HTA that creates a shell object and runs or writes files"
        severity = "medium"
        author = "Sentinel"
    strings:
        $shell = "WScript.Shell" nocase ascii wide
        $ax1 = "ActiveXObject" nocase ascii wide
        $ax2 = "CreateObject" nocase ascii wide
        $act1 = ".Run(" nocase ascii wide
        $act2 = ".Exec(" nocase ascii wide
        $act3 = "ADODB.Stream" nocase ascii wide
    condition:
        filesize < 2MB and $shell and any of ($ax*) and any of ($act*)
}
